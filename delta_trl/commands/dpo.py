"""``delta-trl dpo``: run :mod:`delta_trl.scripts.dpo` (DeltaDPOTrainer) on the rest of the command line."""

from __future__ import annotations

import argparse

from delta_trl.commands import forwarding_parser


def add_parser(subparsers) -> argparse.ArgumentParser:
    return forwarding_parser(
        subparsers,
        "dpo",
        help_text="train one preference task vector with DeltaDPOTrainer (TRL's DPOTrainer + DELTA); `delta-trl dpo "
        "--help` lists its flags",
    )


def run(args: argparse.Namespace) -> int:
    from delta_trl.scripts.dpo import cli

    return cli(args.script_args, prog="delta-trl dpo")
