"""Distilled DPO: train one preference task vector with DeltaDPOTrainer (a drop-in for TRL's DPOTrainer).

Offline default: the embedded SmolLM2-135M-Instruct and a built-in preference set. `builtin:helpful` prefers the
correct answer to an arithmetic question over a wrong one; `builtin:verbose` prefers a long answer over a short one
(the paper's helpfulness-vs-verbosity pair: train both, then sweep θ0 + τ_help + λ·τ_verb with `delta-trl evaluate`).

    python recipes/dpo_delta.py --config recipes/configs/dpo_delta.yaml
    python recipes/dpo_delta.py --config recipes/configs/dpo_delta.yaml --dataset builtin:verbose --output_dir outputs/verbose
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml recipes/dpo_delta.py \
        --config recipes/configs/dpo_delta.yaml --dataset trl-lib/ultrafeedback_binarized --model_name_or_path <hub id>
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from datasets import Dataset, DatasetDict, load_dataset
from trl import ModelConfig, TrlParser

from delta_trl import DeltaDPOConfig, DeltaDPOTrainer, load_model_and_tokenizer
from delta_trl._utils import check_run_output_dir, lora_config_from


@dataclass
class ScriptArguments:
    dataset: str = field(
        default="builtin:helpful",
        metadata={"help": "`builtin:helpful`, `builtin:verbose`, a json/jsonl file or a Hub id with TRL preference "
                  "columns (`prompt`, `chosen`, `rejected`; standard or conversational)."},
    )  # fmt: skip
    num_examples: int = field(default=256, metadata={"help": "Rows generated for a built-in set (10% held out)."})
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


def load_preferences(args: ScriptArguments, seed: int) -> DatasetDict:
    if args.dataset.startswith("builtin:"):
        data = builtin_preferences(args.dataset.split(":", 1)[1], args.num_examples, seed)
        return data.train_test_split(test_size=0.1, seed=seed)
    path = Path(args.dataset)
    data = load_dataset("json", data_files=str(path)) if path.is_file() else load_dataset(args.dataset)
    if "test" not in data:
        data = data["train"].train_test_split(test_size=0.1, seed=seed)
    return data


def main(script_args: ScriptArguments, training_args: DeltaDPOConfig, model_args: ModelConfig) -> dict:
    output_dir = Path(training_args.output_dir)
    check_run_output_dir(
        output_dir, overwrite=script_args.overwrite_output, resuming=bool(training_args.resume_from_checkpoint)
    )
    peft_config = lora_config_from(model_args)
    with training_args.main_process_first(desc="model conversion"):
        model, tokenizer = load_model_and_tokenizer(
            model_args.model_name_or_path,
            dtype=model_args.dtype,
            revision=model_args.model_revision,
            attn_implementation=model_args.attn_implementation or "sdpa",
        )
    data = load_preferences(script_args, training_args.seed)
    trainer = DeltaDPOTrainer(
        model=model,
        args=training_args,
        train_dataset=data["train"],
        eval_dataset=data["test"],
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    before = trainer.evaluate()
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()
    after = trainer.evaluate()
    results = {
        "model": model_args.model_name_or_path,
        "dataset": script_args.dataset,
        "delta_mode": training_args.delta_mode,
        "steps": trainer.state.global_step,
        "eval_before": before,
        "eval_after": after,
        "adapter": str(output_dir),
    }
    if trainer.is_world_process_zero():
        (output_dir / "results.json").write_text(json.dumps(results, indent=2))
        print(
            f"\nDistilled DPO ({training_args.delta_mode}) on {script_args.dataset}, {trainer.state.global_step} steps: "
            f"held-out preference accuracy {before.get('eval_rewards/accuracies', float('nan')):.3f} -> "
            f"{after.get('eval_rewards/accuracies', float('nan')):.3f}, DPO loss {before['eval_loss']:.4f} -> "
            f"{after['eval_loss']:.4f}\n  student adapter: {output_dir}"
        )
    return results


def make_parser() -> TrlParser:
    return TrlParser((ScriptArguments, DeltaDPOConfig, ModelConfig))


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
