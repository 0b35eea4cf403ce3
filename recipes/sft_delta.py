"""`python recipes/sft_delta.py ARGS` = `delta-trl sft ARGS`: the script is :mod:`delta_trl.scripts.sft`.

    python recipes/sft_delta.py --config recipes/configs/sft_delta.yaml
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml recipes/sft_delta.py \
        --config recipes/configs/sft_delta.yaml --model_name_or_path HuggingFaceTB/SmolLM2-360M-Instruct
"""

import sys

from delta_trl.errors import run_cli
from delta_trl.scripts.sft import (
    ScriptArguments,
    builtin_sentiment,
    check_args,
    cli,
    completion_accuracy,
    load_task,
    main,
    make_parser,
    parse_args,
)


__all__ = [
    "ScriptArguments",
    "builtin_sentiment",
    "check_args",
    "cli",
    "completion_accuracy",
    "load_task",
    "main",
    "make_parser",
    "parse_args",
]

if __name__ == "__main__":
    sys.exit(run_cli(cli))
