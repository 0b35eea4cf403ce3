"""``delta-trl`` command line: one sub-command per module in :mod:`delta_trl.commands`.

Each command module defines ``add_parser(subparsers) -> argparse.ArgumentParser`` and ``run(args) -> int``. A user
error (bad flag, missing or damaged file, unreachable Hub id, existing output) is one ``error:`` line on stderr and
exit status 2; ``--debug`` or ``DELTA_TRL_DEBUG=1`` shows the traceback (:mod:`delta_trl.errors`).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from delta_trl.errors import DEBUG_ENV, OneLineArgumentParser, run_cli


# name -> module. Command modules keep heavy imports (torch, transformers) inside `run` so `--help` stays fast.
COMMANDS: dict[str, str] = {
    "prepare-model": "delta_trl.commands.prepare_model",
    "merge": "delta_trl.commands.merge",
    "evaluate": "delta_trl.commands.evaluate",
    "curvature": "delta_trl.commands.curvature",
}


def make_parser() -> OneLineArgumentParser:
    parser = OneLineArgumentParser(
        prog="delta-trl",
        description="DELTA task vectors: train (see recipes/), precompute curvature, merge and evaluate LoRA adapters.",
    )
    parser.add_argument(
        "--debug", action="store_true", help=f"on an error, show the full traceback (also {DEBUG_ENV}=1)"
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in COMMANDS.values():
        module = importlib.import_module(module_name)
        sub = module.add_parser(subparsers)
        sub.set_defaults(_run=module.run)
    return parser


def _main(argv: list[str]) -> int:
    args = make_parser().parse_args(argv)
    return int(args._run(args) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``delta-trl``; returns the exit status (2 after a one-line ``error:`` for a user error)."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
