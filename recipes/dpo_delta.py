"""`python recipes/dpo_delta.py ARGS` = `delta-trl dpo ARGS`: the script is :mod:`delta_trl.scripts.dpo`.

    python recipes/dpo_delta.py --config recipes/configs/dpo_delta.yaml
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml recipes/dpo_delta.py \
        --config recipes/configs/dpo_delta.yaml --dataset_name trl-lib/ultrafeedback_binarized --model_name_or_path <hub id>
"""

import sys

from delta_trl.errors import run_cli
from delta_trl.scripts.dpo import (
    ScriptArguments,
    builtin_preferences,
    check_args,
    cli,
    load_preferences,
    main,
    make_parser,
    parse_args,
    preference_accuracy_by_logp,
)


__all__ = [
    "ScriptArguments",
    "builtin_preferences",
    "check_args",
    "cli",
    "load_preferences",
    "main",
    "make_parser",
    "parse_args",
    "preference_accuracy_by_logp",
]

if __name__ == "__main__":
    sys.exit(run_cli(cli))
