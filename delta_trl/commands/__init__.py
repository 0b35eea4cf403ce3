"""Sub-commands of the ``delta-trl`` command line."""

from __future__ import annotations

import argparse


def forwarding_parser(subparsers, name: str, help_text: str) -> argparse.ArgumentParser:
    """A sub-command that hands every argument after its name to a training script (as ``trl sft`` does).

    It defines no flags of its own, not even ``--help``: :func:`delta_trl.cli.main` parses the command line with
    ``parse_known_args`` and puts what follows the command name, in order, in ``args.script_args``; the script's own
    ``TrlParser`` then parses it (``--config``, ``--help``, ...). Nothing heavy is imported to build this parser.
    """
    parser = subparsers.add_parser(name, help=help_text, add_help=False)
    parser.set_defaults(_forwards=True)
    return parser
