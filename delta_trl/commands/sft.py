"""``delta-trl sft``: run :mod:`delta_trl.scripts.sft` (DeltaSFTTrainer) on the rest of the command line."""

from __future__ import annotations

import argparse

from delta_trl.commands import forwarding_parser


def add_parser(subparsers) -> argparse.ArgumentParser:
    return forwarding_parser(
        subparsers,
        "sft",
        help_text="train one task vector with DeltaSFTTrainer (TRL's SFTTrainer + DELTA); `delta-trl sft --help` lists "
        "its flags",
    )


def run(args: argparse.Namespace) -> int:
    from delta_trl.scripts.sft import cli

    return cli(args.script_args, prog="delta-trl sft")
