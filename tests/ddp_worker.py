"""Worker for test_distributed.py: one SGD step of a DELTA trainer in every mode; every rank saves its LoRA weights.

Usage: ddp_worker.py {seq2seq,sft,dpo} OUTPUT_DIR PER_DEVICE_BATCH REFERENCE_TEXT_FILE
"""

import sys
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig
from safetensors.torch import save_file
from transformers import DataCollatorForSeq2Seq


sys.path.insert(0, str(Path(__file__).parent))
from conftest import addition_rows, delta_config, make_llama, make_tokenizer  # noqa: E402

from delta_trl import DeltaDPOConfig, DeltaDPOTrainer, DeltaSFTConfig, DeltaSFTTrainer, DeltaTrainer  # noqa: E402


MODES = ("delta", "nonlinear", "linear", "kd_only", "curvature_only")
LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0}


def preference_rows(n: int) -> list[dict]:
    return [{"prompt": f"What is {i % 5} + {i % 3}?", "chosen": f" {i % 5 + i % 3}", "rejected": f" {i} or so"}
            for i in range(n)]  # fmt: skip


def build(kind: str, mode: str, output: Path, per_device_batch: int, reference: str):
    tokenizer = make_tokenizer(300)
    common = {
        "output_dir": str(output / mode / "run"), "max_steps": 1, "per_device_train_batch_size": per_device_batch,
        "optim": "sgd", "learning_rate": 0.5, "lr_scheduler_type": "constant", "max_grad_norm": 0.0,
        "alpha_sampling": "uniform", "delta_mode": mode, "seed": 0, "use_cpu": True, "report_to": "none",
        "disable_tqdm": True, "save_strategy": "no", "dataloader_num_workers": 0,
    }  # fmt: skip
    if mode == "curvature_only":
        common |= {"curvature_weight": 3.0, "curvature_path": str(output / "curvature"), "curvature_dataset": reference,
                   "curvature_num_samples": 8, "curvature_max_length": 16}  # fmt: skip
    torch.manual_seed(0)
    if kind == "sft":  # TRL's SFTTrainer on prompt-completion data, tokenized by TRL
        rows = [{"prompt": f"What is {i % 7} + {i % 5}?", "completion": f" {i % 7 + i % 5}"} for i in range(4)]
        return DeltaSFTTrainer(
            model=make_llama(),
            args=DeltaSFTConfig(**common, bf16=False, gradient_checkpointing=False, max_length=32),
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            peft_config=LoraConfig(**LORA),
        )
    if kind == "seq2seq":  # DeltaTrainer (Seq2SeqTrainer) on hand-tokenized causal-LM rows
        common.pop("output_dir")
        return DeltaTrainer(
            model=make_llama(),
            args=delta_config(output / mode, **common),
            train_dataset=Dataset.from_list(addition_rows(tokenizer, n=4)),
            data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True),
            processing_class=tokenizer,
            peft_config=LoraConfig(**LORA),
        )
    return DeltaDPOTrainer(
        model=make_llama(initializer_range=0.2),
        args=DeltaDPOConfig(**common, bf16=False, gradient_checkpointing=False, max_length=64),
        train_dataset=Dataset.from_list(preference_rows(4)),
        processing_class=tokenizer,
        peft_config=LoraConfig(**LORA),
    )


def main(kind: str, output: Path, per_device_batch: int, reference: str) -> None:
    for mode in MODES:
        trainer = build(kind, mode, output, per_device_batch, reference)
        trainer.train()
        model = trainer.accelerator.unwrap_model(trainer.model)
        state = {k: p.detach().contiguous() for k, p in model.named_parameters() if "lora_" in k}
        save_file(state, output / mode / f"rank{trainer.args.process_index}.safetensors")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
