"""Cost of one DELTA training step against plain LoRA training, on the same model and batch, in one run.

    OMP_NUM_THREADS=2 python bench/step_cost.py                       # SFT: tiny Llama + embedded SmolLM2-135M
    OMP_NUM_THREADS=2 python bench/step_cost.py --objective dpo       # DeltaDPOTrainer vs DPOTrainer + LoRA
    python bench/step_cost.py --models embedded --steps 20 --batch_size 8 --seq_len 128

SFT compares ``Seq2SeqTrainer`` + LoRA with ``DeltaTrainer``; DPO compares TRL's ``DPOTrainer`` + LoRA (policy and
reference forwards) with ``DeltaDPOTrainer`` (student forward + one JVP whose primal is the reference).

Each (model, trainer) pair runs in its own child process so that peak memory is its own: on CUDA the peak of
``torch.cuda.max_memory_allocated`` during the steps, on CPU (Linux) the peak RSS during the steps (reset through
``/proc/self/clear_refs``) over the RSS with the model loaded: activations, gradients, optimizer state. Time is the median of ``training_step`` + optimizer step over
``--steps`` steps after ``--warmup`` steps. Prints a table of ratios to plain LoRA and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


TRAINERS = ("lora", "delta", "linear")


def _proc_status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(c): i for i, c in enumerate(range(97, 123))} | {"<pad>": 26, "<eos>": 27}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def _worker(args: argparse.Namespace) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM, Seq2SeqTrainer, Seq2SeqTrainingArguments
    from trl import DPOConfig, DPOTrainer

    from delta_trl import DeltaConfig, DeltaDPOConfig, DeltaDPOTrainer, DeltaTrainer, load_model_and_tokenizer

    torch.manual_seed(0)
    tokenizer = None
    if args.model == "tiny":
        config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
        model = LlamaForCausalLM(config)
    else:
        model, tokenizer = load_model_and_tokenizer(args.model, attn_implementation="sdpa")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    vocab = model.config.vocab_size
    ids = torch.randint(10, vocab, (args.batch_size, args.seq_len), device=device)
    common = {"output_dir": "/tmp/delta_trl_bench", "report_to": "none", "use_cpu": device == "cpu",
              "bf16": args.bf16, "learning_rate": 1e-4, "max_steps": args.steps + args.warmup}  # fmt: skip
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    completion = torch.zeros_like(ids)
    completion[:, args.seq_len // 2 :] = 1  # prompt / completion split
    if args.objective == "sft":
        batch = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "labels": ids.masked_fill(completion == 0, -100),
        }
        num_items = (batch["labels"][:, 1:] != -100).sum()
        if args.trainer == "lora":
            trainer = Seq2SeqTrainer(model=get_peft_model(model, lora), args=Seq2SeqTrainingArguments(**common))
        else:
            trainer = DeltaTrainer(model=model, args=DeltaConfig(delta_mode=args.trainer, **common), peft_config=lora)
    else:
        # rows 0..B-1 chosen, B..2B-1 rejected: the collated layout of TRL's preference batches
        batch = {"input_ids": ids.repeat(2, 1), "attention_mask": torch.ones_like(ids).repeat(2, 1),
                 "completion_mask": completion.repeat(2, 1)}  # fmt: skip
        batch["input_ids"][args.batch_size :, args.seq_len // 2 :] = torch.randint_like(
            ids[:, args.seq_len // 2 :], 10, vocab
        )
        num_items = None
        tokenizer = tokenizer or _tiny_tokenizer()
        dpo = {"gradient_checkpointing": False, "max_length": args.seq_len, **common}
        data = Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}] * 2)
        if args.trainer == "lora":
            trainer = DPOTrainer(model=model, args=DPOConfig(**dpo), train_dataset=data, processing_class=tokenizer,
                                 peft_config=lora)  # fmt: skip
        else:
            trainer = DeltaDPOTrainer(model=model, args=DeltaDPOConfig(delta_mode=args.trainer, **dpo),
                                      train_dataset=data, processing_class=tokenizer, peft_config=lora)  # fmt: skip
    trainer.create_optimizer_and_scheduler(num_training_steps=args.steps + args.warmup)
    trainer.current_gradient_accumulation_steps = 1  # set by `train()`, which the benchmark bypasses
    trainer.model.to(device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_memory = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to the current RSS
        base_memory = _proc_status_bytes("VmRSS")
    times = []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        trainer.training_step(trainer.model, batch, num_items)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base_memory
    else:
        peak = _proc_status_bytes("VmHWM") - base_memory
    return {"objective": args.objective, "model": args.model, "trainer": args.trainer, "device": device, "median_step_s": statistics.median(times),
            "step_times_s": times, "peak_memory_bytes": peak}  # fmt: skip


def main(args: argparse.Namespace) -> dict:
    results = []
    for model in args.models:
        for trainer in TRAINERS:
            command = [sys.executable, __file__, "--worker", "--model", model, "--trainer", trainer, "--objective", args.objective,
                       "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch_size",
                       str(args.batch_size), "--seq_len", str(args.seq_len)] + (["--bf16"] if args.bf16 else [])  # fmt: skip
            print(f"running {args.objective}: {model} / {trainer} ...", flush=True)
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"{model} / {trainer} failed:\n{done.stderr[-3000:]}")
            out = done.stdout
            results.append(json.loads(out.strip().splitlines()[-1]))
    rows = []
    for model in args.models:
        base = next(r for r in results if r["model"] == model and r["trainer"] == "lora")
        for r in (r for r in results if r["model"] == model):
            r["time_ratio"] = r["median_step_s"] / base["median_step_s"]
            r["memory_ratio"] = r["peak_memory_bytes"] / max(base["peak_memory_bytes"], 1)
            rows.append(r)
    print(f"\n{args.objective}: batch {args.batch_size} x {args.seq_len} tokens, {args.steps} timed steps, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}")  # fmt: skip
    print(f"{'model':<10} {'trainer':<8} {'median step (s)':>16} {'time x LoRA':>12} {'peak mem (MiB)':>15} "
          f"{'mem x LoRA':>11}")  # fmt: skip
    for r in rows:
        print(f"{r['model']:<10} {r['trainer']:<8} {r['median_step_s']:>16.4f} {r['time_ratio']:>12.2f} "
              f"{r['peak_memory_bytes'] / 2**20:>15.1f} {r['memory_ratio']:>11.2f}")  # fmt: skip
    report = {"settings": vars(args), "results": rows}
    output = Path(args.output or f"bench/results/step_cost_{args.objective}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2))
    print(f"\nwritten {output}")
    return report


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objective", choices=("sft", "dpo"), default="sft", help="SFT (DeltaTrainer) or DPO")
    parser.add_argument("--models", nargs="+", default=["tiny", "embedded"], help="`tiny`, `embedded` or model ids")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=64)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU only: ~10x slower on CPUs)")
    parser.add_argument("--output", default=None, help="default: bench/results/step_cost_<objective>.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--trainer", choices=TRAINERS, help=argparse.SUPPRESS)
    return parser


if __name__ == "__main__":
    arguments = make_parser().parse_args()
    if arguments.worker:
        print(json.dumps(_worker(arguments)))
    else:
        main(arguments)
