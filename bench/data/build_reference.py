"""Build the reference text the evidence study estimates θ0's curvature on: English prose that is not task data.

DELTA's curvature penalty is task-agnostic: θ0's EK-FAC GGN is estimated once on general text and reused by every
task vector. Offline, the prose at hand is the licence texts Debian installs in every system
(``/usr/share/common-licenses``, package ``base-files``): the first ``--num`` paragraphs of at least ``--min-words``
words, files in name order, whitespace collapsed, one ``{"text": ...}`` JSON line per paragraph. Deterministic for
a given ``base-files`` version; the licence texts allow verbatim copies.

    python bench/data/build_reference.py    # -> ${DELTA_TRL_CACHE:-~/.cache/delta_trl}/reference/licenses.jsonl

Then train with ``--set training.curvature_dataset=<that file>`` (docs/RESULTS.md, "The curvature term").
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
from pathlib import Path


def licence_paragraphs(root: Path, num: int, min_words: int) -> list[str]:
    """The first `num` blank-line-separated paragraphs of ≥ `min_words` words of the files under `root`, name order."""
    paragraphs: list[str] = []
    for path in sorted(p for p in root.iterdir() if p.is_file() and not p.is_symlink()):
        for block in re.split(r"\n\s*\n", path.read_text(encoding="utf-8", errors="replace")):
            text = " ".join(block.split())
            if len(text.split()) >= min_words:
                paragraphs.append(text)
                if len(paragraphs) == num:
                    return paragraphs
    raise SystemExit(f"error: {root} holds only {len(paragraphs)} paragraphs of ≥ {min_words} words (asked {num})")


def default_output() -> Path:
    cache = Path(os.environ.get("DELTA_TRL_CACHE", Path.home() / ".cache" / "delta_trl"))
    return cache / "reference" / "licenses.jsonl"


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", type=Path, default=Path("/usr/share/common-licenses"), help="folder of prose files")
    p.add_argument("--output", type=Path, default=None, help="JSONL file to write (default: the cache, see above)")
    p.add_argument("--num", type=int, default=64, help="paragraphs to keep")
    p.add_argument("--min-words", type=int, default=40, help="shortest paragraph kept, in words")
    return p


def main(args: list[str] | None = None) -> int:
    opts = make_parser().parse_args(args)
    if not opts.source.is_dir():
        raise SystemExit(f"error: {opts.source} is not a folder (Debian's base-files installs it)")
    rows = licence_paragraphs(opts.source, opts.num, opts.min_words)
    out = opts.output or default_output()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=out.parent, delete=False, suffix=".tmp") as f:
        f.writelines(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in rows)
    os.replace(f.name, out)
    print(f"wrote {len(rows)} paragraphs ({sum(len(t.split()) for t in rows)} words) to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
