"""Distilled DPO: train one preference task vector with DeltaDPOTrainer (a drop-in for TRL's DPOTrainer).

The script behind ``delta-trl dpo`` and ``python recipes/dpo_delta.py``, laid out like TRL's ``trl/scripts/dpo.py``:
``TrlParser((ScriptArguments, DeltaDPOConfig, ModelConfig))`` where ``ScriptArguments`` is TRL's (``--dataset_name``,
``--dataset_config``, ``--dataset_train_split``, ``--dataset_test_split``) plus what the recipe needs beyond it.

Offline default: the embedded SmolLM2-135M-Instruct and a built-in preference set. `builtin:helpful` prefers the
correct answer to an arithmetic question over a wrong one; `builtin:verbose` prefers a long answer over a short one
(the paper's helpfulness-vs-verbosity pair: train both, then trace the front of θ0 + τ_help + λ·τ_verb with the Python
function `delta_trl.evaluation.diagnostics.dpo_front`, docs/MERGING.md §3; `delta-trl evaluate` scores classification tasks only).

It reports, on the held-out pairs, how often the chosen response is more likely than the rejected one
(log π(chosen | prompt) > log π(rejected | prompt), summed over the completion tokens) for the base model and for the
task vector, and DPO's reward accuracy after training (implicit reward margin over the base model > 0; before training
the policy is the base model, so every margin is 0 and that accuracy says nothing).

    delta-trl dpo --config recipes/configs/dpo_delta.yaml
    delta-trl dpo --config recipes/configs/dpo_delta.yaml --dataset_name builtin:verbose --output_dir outputs/verbose
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml recipes/dpo_delta.py \\
        --config recipes/configs/dpo_delta.yaml --dataset_name trl-lib/ultrafeedback_binarized --model_name_or_path <hub id>

A wrong flag, file or model ends with one `error:` line and exit status 2 (`--debug` or DELTA_TRL_DEBUG=1: the
traceback); `--push_to_hub --hub_model_id owner/name` uploads the adapter with a model card after training.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trl
from datasets import Dataset, DatasetDict
from torch.utils.data import DataLoader
from trl import ModelConfig, TrlParser

from delta_trl import DeltaDPOConfig, DeltaDPOTrainer, load_model_and_tokenizer
from delta_trl._utils import check_run_output_dir, lora_config_from
from delta_trl.data import load_rows
from delta_trl.errors import (
    UserError,
    check_lora_arguments,
    check_lora_targets,
    check_model_source,
    check_positive,
    check_training_arguments,
    model_skeleton,
    new_folder_removed_on_error,
    one_line_errors,
    parse_recipe_arguments,
    user_errors,
)
from delta_trl.evaluation.diagnostics import logp_preference_accuracy
from delta_trl.hub import check_hub_arguments, push_after_training


BUILTIN_SETS = ("builtin:helpful", "builtin:verbose")


@dataclass
class ScriptArguments(trl.ScriptArguments):
    """TRL's ``ScriptArguments`` (``--dataset_name`` also takes a local file or a built-in set) plus the recipe's."""

    dataset_name: str | None = field(
        default="builtin:helpful",
        metadata={"help": "`builtin:helpful`, `builtin:verbose`, a json/jsonl file or a Hub id with TRL preference "
                  "columns (`prompt`, `chosen`, `rejected`; standard or conversational). Without a "
                  "--dataset_test_split split, a tenth of the training split is held out."},
    )  # fmt: skip
    num_examples: int = field(default=256, metadata={"help": "Rows generated for a built-in set (a tenth held out)."})
    overwrite_output: bool = field(
        default=False,
        metadata={"help": "Allow writing into a non-empty output_dir (nothing is overwritten otherwise)."},
    )


def builtin_preferences(kind: str, n: int, seed: int) -> Dataset:
    """Conversational preference pairs: correct vs wrong sums (`helpful`) or long vs short answers (`verbose`)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(2, 49), rng.randint(2, 49)
        prompt = [{"role": "user", "content": f"What is {a} + {b}?"}]
        if kind == "helpful":
            wrong = a + b + rng.choice([-10, -2, -1, 1, 2, 10])
            chosen, rejected = f"{a} + {b} = {a + b}.", f"{a} + {b} = {wrong}."
        elif kind == "verbose":
            chosen = f"Let me work it out step by step. We add {a} and {b}: the tens give {10 * (a // 10 + b // 10)}, " \
                     f"the units give {a % 10 + b % 10}, so the total is {a + b}."  # fmt: skip
            rejected = f"{a + b}."
        else:
            raise ValueError(f"Unknown built-in preference set {kind!r}: use builtin:helpful or builtin:verbose.")
        rows.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
                     "rejected": [{"role": "assistant", "content": rejected}]})  # fmt: skip
    return Dataset.from_list(rows)


PREFERENCE_HINT = (
    "Provide TRL's preference format: `prompt`, `chosen` and `rejected` per row, each a string (standard) or a list "
    'of {"role", "content"} messages (conversational).'
)


def load_preferences(args: ScriptArguments, seed: int) -> DatasetDict:
    """``train`` and ``test`` splits with ``prompt``, ``chosen`` and ``rejected`` columns."""
    if args.dataset_name.startswith("builtin:"):
        data = builtin_preferences(args.dataset_name.split(":", 1)[1], args.num_examples, seed)
        return data.train_test_split(test_size=0.1, seed=seed)
    kinds = (str, list)
    columns = {"prompt": kinds, "chosen": kinds, "rejected": kinds}
    data = load_rows(args.dataset_name, "--dataset_name", columns, PREFERENCE_HINT, config=args.dataset_config,
                     split=args.dataset_train_split)  # fmt: skip
    train, test_split = data[args.dataset_train_split], args.dataset_test_split
    if test_split in data and test_split != args.dataset_train_split:
        return DatasetDict({"train": train, "test": data[test_split]})
    if len(train) < 2:
        raise UserError(f"{args.dataset_name}: {len(train)} pair; give at least 2 (10%, at least 1, is held out).")
    return train.train_test_split(test_size=max(1, len(train) // 10), seed=seed)


def preference_accuracy_by_logp(trainer: DeltaDPOTrainer, alpha: float) -> dict:
    """Held-out pairs with log π(chosen) > log π(rejected) at θ0 + α·τ (α = 0: the base model), TRL's tokenization."""
    loader = DataLoader(
        trainer.eval_dataset, batch_size=trainer.args.per_device_eval_batch_size, collate_fn=trainer.data_collator
    )
    model = trainer.accelerator.unwrap_model(trainer.model)
    linearized = trainer.args.delta_mode == "linear"
    return logp_preference_accuracy(model, loader, {model.active_adapter: alpha}, linearized=linearized)


def check_args(script_args: ScriptArguments, training_args: DeltaDPOConfig, model_args: ModelConfig) -> None:
    """Refuse, before any work, values with which the run cannot work (raises :class:`UserError`)."""
    check_training_arguments(training_args)
    check_lora_arguments(model_args)
    check_positive({"--beta": training_args.beta, "--max_length": training_args.max_length})
    name = script_args.dataset_name
    if not name:
        raise UserError(
            "--dataset_name: give builtin:helpful, builtin:verbose, a json/jsonl file or a Hub dataset id."
        )
    if script_args.dataset_streaming:
        raise UserError("--dataset_streaming: the recipe holds pairs out and scores them; load the dataset whole.")
    if name.startswith("builtin:"):
        if name not in BUILTIN_SETS:
            raise UserError(f"--dataset_name {name}: the built-in sets are builtin:helpful and builtin:verbose.")
        if script_args.num_examples < 10:
            raise UserError(f"--num_examples {script_args.num_examples}: give at least 10 (10% are held out).")
    check_model_source(model_args.model_name_or_path, "--model_name_or_path")
    check_hub_arguments(training_args, model_args)


def main(script_args: ScriptArguments, training_args: DeltaDPOConfig, model_args: ModelConfig) -> dict:
    """Train, save and report one preference task vector. User errors raise :class:`UserError`."""
    check_args(script_args, training_args, model_args)
    output_dir = Path(training_args.output_dir)
    hub_repo = training_args.hub_model_id if training_args.push_to_hub else None
    training_args.push_to_hub = False  # pushed by us after training, with a model card; the Trainer never pushes
    with new_folder_removed_on_error(output_dir):
        with user_errors():
            check_run_output_dir(
                output_dir, overwrite=script_args.overwrite_output, resuming=bool(training_args.resume_from_checkpoint)
            )
            peft_config = lora_config_from(model_args)
            with user_errors("--dataset_name"):
                data = load_preferences(script_args, training_args.seed)
            skeleton = model_skeleton(model_args.model_name_or_path, model_args.model_revision)
            check_lora_targets(skeleton, model_args.lora_target_modules, "--lora_target_modules")
            with (
                training_args.main_process_first(desc="model conversion"),
                user_errors(f"--model_name_or_path {model_args.model_name_or_path}", also=(ImportError,)),
            ):
                model, tokenizer = load_model_and_tokenizer(
                    model_args.model_name_or_path,
                    dtype=model_args.dtype,
                    revision=model_args.model_revision,
                    attn_implementation=model_args.attn_implementation or "sdpa",
                )
            trainer = DeltaDPOTrainer(
                model=model,
                args=training_args,
                train_dataset=data["train"],
                eval_dataset=data["test"],
                processing_class=tokenizer,
                peft_config=peft_config,
            )
        base_preference = preference_accuracy_by_logp(trainer, 0.0)
        before = trainer.evaluate()
        trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model()
    after = trainer.evaluate()
    tuned_preference = preference_accuracy_by_logp(trainer, 1.0)
    results = {
        "model": model_args.model_name_or_path,
        "dataset": script_args.dataset_name,
        "delta_mode": training_args.delta_mode,
        "steps": trainer.state.global_step,
        "logp_preference_base": base_preference,
        "logp_preference_task_vector": tuned_preference,
        "eval_before": before,
        "eval_after": after,
        "adapter": str(output_dir),
    }
    if trainer.is_world_process_zero():
        (output_dir / "results.json").write_text(json.dumps(results, indent=2))
        print(
            f"\nDistilled DPO ({training_args.delta_mode}) on {script_args.dataset_name}, {trainer.state.global_step} steps, "
            f"{base_preference['pairs']} held-out pairs:\n"
            f"  chosen more likely than rejected (log-probability): base {base_preference['accuracy']:.3f} -> "
            f"task vector {tuned_preference['accuracy']:.3f}\n"
            f"  DPO reward accuracy (margin over the base > 0) after training: "
            f"{after.get('eval_rewards/accuracies', float('nan')):.3f}; DPO loss {before['eval_loss']:.4f} -> "
            f"{after['eval_loss']:.4f}\n  student adapter: {output_dir}"
        )
        if hub_repo:
            card = {"held-out preference accuracy by log-probability, base model": base_preference["accuracy"],
                    "held-out preference accuracy by log-probability, task vector": tuned_preference["accuracy"],
                    "held-out DPO reward accuracy": after.get("eval_rewards/accuracies"),
                    "dataset": script_args.dataset_name, "optimizer steps": trainer.state.global_step}  # fmt: skip
            push_after_training(output_dir, hub_repo, training_args, card)
    return results


def make_parser(prog: str | None = None) -> TrlParser:
    """``TrlParser((ScriptArguments, DeltaDPOConfig, ModelConfig))`` whose flag errors are one line."""
    return one_line_errors(TrlParser((ScriptArguments, DeltaDPOConfig, ModelConfig), prog=prog))


def parse_args(
    argv: Sequence[str] | None = None, prog: str | None = None
) -> tuple[ScriptArguments, DeltaDPOConfig, ModelConfig]:
    """Parse the command line and ``--config``; a value that cannot work raises :class:`UserError` here."""
    script_args, training_args, model_args = parse_recipe_arguments(make_parser(prog), argv)
    check_args(script_args, training_args, model_args)
    return script_args, training_args, model_args


def cli(argv: Sequence[str], prog: str | None = None) -> int:
    """Run the script on ``argv`` (``delta-trl dpo ARGS``, ``python recipes/dpo_delta.py ARGS``)."""
    main(*parse_args(argv, prog))
    return 0
