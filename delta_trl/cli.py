"""``delta-trl`` command line: one sub-command per module in :mod:`delta_trl.commands`.

Each command module defines ``add_parser(subparsers) -> argparse.ArgumentParser`` and ``run(args) -> int``; ``sft``
and ``dpo`` hand the rest of the command line to the training scripts (:mod:`delta_trl.scripts`), as ``trl sft`` and
``trl dpo`` do to TRL's. A user
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
    "sft": "delta_trl.commands.sft",
    "dpo": "delta_trl.commands.dpo",
    "experiment": "delta_trl.commands.experiment",
}


def make_parser() -> OneLineArgumentParser:
    parser = OneLineArgumentParser(
        prog="delta-trl",
        description="DELTA task vectors: train (sft, dpo), precompute curvature, merge and evaluate LoRA adapters.",
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
    parser = make_parser()
    args, rest = parser.parse_known_args(argv)
    if getattr(args, "_forwards", False):  # sft, dpo: the script parses everything after the command name
        args.script_args = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return int(args._run(args) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``delta-trl``; returns the exit status (2 after a one-line ``error:`` for a user error)."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
