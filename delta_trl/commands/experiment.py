"""``delta-trl experiment CONFIG.yaml``: task vectors per method and task, merged, α chosen on validation, reported.

The same code runs under ``accelerate launch -m delta_trl.experiment CONFIG.yaml`` (DDP / ZeRO-2 training; the
evaluation runs on the main process). See :mod:`delta_trl.experiment.runner` and docs/EXPERIMENTS.md.
"""

from __future__ import annotations

import argparse


EPILOG = """\
examples:
  # the offline smoke experiment on the embedded SmolLM2-135M-Instruct (2 tasks, plain LoRA vs linear vs DELTA)
  delta-trl experiment recipes/configs/experiments/smoke_embedded.yaml

  # the paper's workloads (GPU, Hub access)
  accelerate launch -m delta_trl.experiment recipes/configs/experiments/nli_t5.yaml
  accelerate launch -m delta_trl.experiment recipes/configs/experiments/dpo_help_verb.yaml

  # override any value of the file
  delta-trl experiment my.yaml --set training.max_steps=200 --set methods=[nonlinear,delta] --output_dir runs/x

A rerun with the same output folder reuses every trained task vector and evaluation and resumes a killed training.
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "experiment",
        help="train one task vector per method and task, merge, select α on validation, report on test",
        description="Run a task-arithmetic experiment from one YAML file: for each method, one LoRA task vector per "
        "task, the exact merge θ0 + α·Σ_t τ_t with α chosen on validation rows carved from train, and test scores "
        "(results.json, results.md, plots, merged adapters with model cards).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="CONFIG.yaml", help="the experiment file")
    parser.add_argument("--output_dir", "--output-dir", help="overrides the file's output_dir")
    parser.add_argument("--push_to_hub", "--push-to-hub", metavar="REPO", help="upload the chosen merged adapter")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a value of the file (dotted key, YAML value), e.g. --set training.max_steps=10; repeatable",
    )


def run(args: argparse.Namespace) -> int:
    from delta_trl.experiment.config import load_config
    from delta_trl.experiment.runner import run_experiment

    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    if args.push_to_hub:
        overrides.append(f"push_to_hub={args.push_to_hub}")
    run_experiment(load_config(args.config, overrides))
    return 0
