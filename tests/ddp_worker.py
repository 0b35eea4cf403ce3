"""Worker for test_distributed.py: one optimizer step of DeltaTrainer, then rank 0 saves the LoRA weights."""

import os
import sys
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig
from safetensors.torch import save_file
from transformers import DataCollatorForSeq2Seq


sys.path.insert(0, str(Path(__file__).parent))
from conftest import addition_rows, delta_config, make_llama, make_tokenizer  # noqa: E402

from delta_trl import DeltaTrainer  # noqa: E402


def main(output: Path, per_device_batch: int) -> None:
    tokenizer = make_tokenizer(300)
    torch.manual_seed(0)
    trainer = DeltaTrainer(
        model=make_llama(),
        args=delta_config(
            output.parent,
            max_steps=1,
            per_device_train_batch_size=per_device_batch,
            optim="sgd",
            learning_rate=0.5,
            lr_scheduler_type="constant",
            max_grad_norm=0.0,
            alpha_sampling="uniform",
            delta_mode=os.environ.get("DELTA_MODE", "delta"),
        ),  # fmt: skip
        train_dataset=Dataset.from_list(addition_rows(tokenizer, n=4)),
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )
    trainer.train()
    if trainer.is_world_process_zero():
        state = {k: p.detach().contiguous() for k, p in trainer.model.named_parameters() if "lora_" in k}
        save_file(state, output)


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
