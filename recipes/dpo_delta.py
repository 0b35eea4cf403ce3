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
from peft import LoraConfig
from trl import TrlParser

from delta_trl import DeltaDPOConfig, DeltaDPOTrainer, load_model_and_tokenizer


@dataclass
class ScriptArguments:
    model_name_or_path: str = field(
        default="embedded",
        metadata={"help": "`embedded` (packaged SmolLM2-135M-Instruct, offline), a Hub id or a local folder."},
    )
    dataset: str = field(
        default="builtin:helpful",
        metadata={"help": "`builtin:helpful`, `builtin:verbose`, a json/jsonl file or a Hub id with TRL preference "
                  "columns (`prompt`, `chosen`, `rejected`; standard or conversational)."},
    )  # fmt: skip
    num_examples: int = field(default=256, metadata={"help": "Rows generated for a built-in set (10% held out)."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank of the student."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha of the student."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "v_proj"], metadata={"help": "Modules that get LoRA adapters."}
    )
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


def main(script_args: ScriptArguments, training_args: DeltaDPOConfig) -> dict:
    output_dir = Path(training_args.output_dir)
    if output_dir.is_dir() and any(output_dir.iterdir()) and not script_args.overwrite_output:
        if not training_args.resume_from_checkpoint:
            raise FileExistsError(
                f"{output_dir} is not empty. Pass --overwrite_output to write into it, --resume_from_checkpoint to "
                "continue a run, or choose another --output_dir."
            )
    with training_args.main_process_first(desc="model conversion"):
        model, tokenizer = load_model_and_tokenizer(script_args.model_name_or_path)
    data = load_preferences(script_args, training_args.seed)
    trainer = DeltaDPOTrainer(
        model=model,
        args=training_args,
        train_dataset=data["train"],
        eval_dataset=data["test"],
        processing_class=tokenizer,
        peft_config=LoraConfig(
            r=script_args.lora_r,
            lora_alpha=script_args.lora_alpha,
            target_modules=script_args.lora_target_modules,
            lora_dropout=0.0,
            task_type="CAUSAL_LM",
        ),
    )
    before = trainer.evaluate()
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()
    after = trainer.evaluate()
    results = {
        "model": script_args.model_name_or_path,
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
    return TrlParser((ScriptArguments, DeltaDPOConfig))


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
