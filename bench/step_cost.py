"""Cost of one DELTA training step against plain LoRA training, on the same model and batch, in one run.

    OMP_NUM_THREADS=2 python bench/step_cost.py                       # tiny Llama + embedded SmolLM2-135M
    python bench/step_cost.py --models embedded --steps 20 --batch_size 8 --seq_len 128

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


def _worker(args: argparse.Namespace) -> dict:
    import torch
    from peft import LoraConfig
    from transformers import LlamaConfig, LlamaForCausalLM, Seq2SeqTrainer, Seq2SeqTrainingArguments

    from delta_trl import DeltaConfig, DeltaTrainer, load_model_and_tokenizer

    torch.manual_seed(0)
    if args.model == "tiny":
        config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
        model = LlamaForCausalLM(config)
    else:
        model, _ = load_model_and_tokenizer(args.model, attn_implementation="sdpa")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    vocab = model.config.vocab_size
    ids = torch.randint(10, vocab, (args.batch_size, args.seq_len), device=device)
    labels = ids.clone()
    labels[:, : args.seq_len // 2] = -100  # prompt / completion split, as in SFT
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    common = {"output_dir": "/tmp/delta_trl_bench", "report_to": "none", "use_cpu": device == "cpu",
              "bf16": args.bf16, "learning_rate": 1e-4, "max_steps": args.steps + args.warmup}  # fmt: skip
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    if args.trainer == "lora":
        from peft import get_peft_model

        trainer = Seq2SeqTrainer(model=get_peft_model(model, lora), args=Seq2SeqTrainingArguments(**common))
    else:
        trainer = DeltaTrainer(model=model, args=DeltaConfig(delta_mode=args.trainer, **common), peft_config=lora)
    trainer.create_optimizer_and_scheduler(num_training_steps=args.steps + args.warmup)
    trainer.model.to(device)
    num_items = (labels[:, 1:] != -100).sum()
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
    return {"model": args.model, "trainer": args.trainer, "device": device, "median_step_s": statistics.median(times),
            "step_times_s": times, "peak_memory_bytes": peak}  # fmt: skip


def main(args: argparse.Namespace) -> dict:
    results = []
    for model in args.models:
        for trainer in TRAINERS:
            command = [sys.executable, __file__, "--worker", "--model", model, "--trainer", trainer,
                       "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch_size",
                       str(args.batch_size), "--seq_len", str(args.seq_len)] + (["--bf16"] if args.bf16 else [])  # fmt: skip
            print(f"running {model} / {trainer} ...", flush=True)
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            results.append(json.loads(out.strip().splitlines()[-1]))
    rows = []
    for model in args.models:
        base = next(r for r in results if r["model"] == model and r["trainer"] == "lora")
        for r in (r for r in results if r["model"] == model):
            r["time_ratio"] = r["median_step_s"] / base["median_step_s"]
            r["memory_ratio"] = r["peak_memory_bytes"] / max(base["peak_memory_bytes"], 1)
            rows.append(r)
    print(f"\nbatch {args.batch_size} x {args.seq_len} tokens, {args.steps} timed steps, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}")  # fmt: skip
    print(f"{'model':<10} {'trainer':<8} {'median step (s)':>16} {'time x LoRA':>12} {'peak mem (MiB)':>15} "
          f"{'mem x LoRA':>11}")  # fmt: skip
    for r in rows:
        print(f"{r['model']:<10} {r['trainer']:<8} {r['median_step_s']:>16.4f} {r['time_ratio']:>12.2f} "
              f"{r['peak_memory_bytes'] / 2**20:>15.1f} {r['memory_ratio']:>11.2f}")  # fmt: skip
    report = {"settings": vars(args), "results": rows}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2))
    print(f"\nwritten {args.output}")
    return report


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "embedded"], help="`tiny`, `embedded` or model ids")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=64)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU only: ~10x slower on CPUs)")
    parser.add_argument("--output", default="bench/results/step_cost.json")
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
