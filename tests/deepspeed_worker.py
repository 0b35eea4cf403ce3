"""Worker for test_deepspeed.py: one process, DeepSpeed on the CPU (gloo); prints a JSON line with the outcome."""

import json
import sys
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import DataCollatorForSeq2Seq


sys.path.insert(0, str(Path(__file__).parent))
from conftest import addition_rows, delta_config, make_llama, make_tokenizer  # noqa: E402

from delta_trl import DeltaTrainer  # noqa: E402


def main(stage: int, output_dir: str) -> None:
    config = {
        "zero_optimization": {"stage": stage},
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "torch_adam": True}},
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
    }
    tokenizer = make_tokenizer(300)
    torch.manual_seed(0)
    try:
        trainer = DeltaTrainer(
            model=make_llama(),
            args=delta_config(Path(output_dir), deepspeed=config, max_steps=3, learning_rate=1e-2),
            train_dataset=Dataset.from_list(addition_rows(tokenizer, n=12)),
            data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True),
            peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
        )
    except ValueError as err:
        print(json.dumps({"refused": str(err)}))
        return
    trainer.train()
    teacher = [p for n, p in trainer.model.named_parameters() if ".lora_B.delta_teacher." in n]
    logs = [h for h in trainer.state.log_history if "delta/distill_loss" in h]
    print(json.dumps({"steps": trainer.state.global_step, "teacher_moved": max(p.abs().max().item() for p in teacher),
                      "logged": logs[-1]}))  # fmt: skip


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
