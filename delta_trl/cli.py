"""``delta-trl`` command line: one sub-command per module in :mod:`delta_trl.commands`.

Each command module defines ``add_parser(subparsers) -> argparse.ArgumentParser`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence


# name -> module. Command modules keep heavy imports (torch, transformers) inside `run` so `--help` stays fast.
COMMANDS: dict[str, str] = {
    "prepare-model": "delta_trl.commands.prepare_model",
    "merge": "delta_trl.commands.merge",
    "evaluate": "delta_trl.commands.evaluate",
    "curvature": "delta_trl.commands.curvature",
}


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="delta-trl",
        description="DELTA task vectors: train (see recipes/), precompute curvature, merge and evaluate LoRA adapters.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in COMMANDS.values():
        module = importlib.import_module(module_name)
        sub = module.add_parser(subparsers)
        sub.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
