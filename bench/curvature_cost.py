"""Cost of the curvature: estimation time per 1,000 reference texts, and the penalty's share of a DELTA step.

    OMP_NUM_THREADS=2 python bench/curvature_cost.py                        # embedded SmolLM2-135M, LoRA q/v r=8
    python bench/curvature_cost.py --num_samples 256 --max_length 128 --steps 5

Estimation is timed on ``--num_samples`` texts of ``--max_length`` tokens and extrapolated linearly to 1,000 texts
(both passes of EK-FAC, and K-FAC's single pass). The penalty is timed as in training: ``curvature_penalty`` forward
and backward for the student and for the (unparked) teacher, against a full ``DeltaTrainer`` step
(``training_step`` + optimizer step) on a ``--batch_size × --max_length`` batch; medians over ``--steps`` after one
warm-up. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path


def _texts(n: int, tokenizer, length: int) -> list[str]:
    """``n`` distinct windows of ``length`` tokens over the repository's own prose (no download)."""
    root = Path(__file__).resolve().parents[1]
    prose = " ".join(p.read_text() for p in sorted([*root.glob("*.md"), *(root / "docs").glob("*.md")]))
    ids = tokenizer(prose, add_special_tokens=False).input_ids
    if len(ids) < length + n:
        raise ValueError("Not enough local text for the requested windows.")
    stride = max(1, (len(ids) - length) // n)
    return [tokenizer.decode(ids[i * stride : i * stride + length]) for i in range(n)]


def _median_time(fn, steps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(args: argparse.Namespace) -> dict:
    import torch
    from peft import LoraConfig

    from delta_trl import DeltaConfig, DeltaTrainer, load_model_and_tokenizer
    from delta_trl.core.adapters import unparked
    from delta_trl.curvature.factors.estimation import estimate_curvature
    from delta_trl.curvature.factors.factors import curvature_penalty

    torch.manual_seed(0)
    model, tokenizer = load_model_and_tokenizer(args.model, attn_implementation="sdpa")
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    config = DeltaConfig(output_dir="/tmp/delta_trl_bench", report_to="none", use_cpu=True, bf16=False,
                         learning_rate=1e-4, max_steps=args.steps + 1, delta_mode="delta")  # fmt: skip
    trainer = DeltaTrainer(model=model, args=config, peft_config=lora)
    trainer.create_optimizer_and_scheduler(num_training_steps=args.steps + 1)
    peft_model = trainer.model
    texts = _texts(args.num_samples, tokenizer, args.max_length)

    estimation = {}
    for estimator in ("ekfac", "kfac"):
        start = time.perf_counter()
        factors = estimate_curvature(peft_model, tokenizer, texts, max_length=args.max_length,
                                     batch_size=args.estimation_batch_size, estimator=estimator, progress=False)  # fmt: skip
        seconds = time.perf_counter() - start
        estimation[estimator] = {
            "seconds": seconds,
            "seconds_per_1000_samples": seconds / len(texts) * 1000,
            "tokens": factors.metadata["num_tokens"],
            "megabytes": sum(r["bytes"] for r in factors.size_report()) / 2**20,
        }
        if estimator == "ekfac":
            ekfac = factors.to(dtype=torch.float32)

    ids = torch.randint(10, model.config.vocab_size, (args.batch_size, args.max_length))
    labels = ids.clone()
    labels[:, : args.max_length // 2] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    num_items = (labels[:, 1:] != -100).sum()

    def step() -> None:
        trainer.training_step(peft_model, batch, num_items)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()

    def penalty() -> None:
        value = curvature_penalty(peft_model, ekfac, "default")
        with unparked(peft_model, config.teacher_adapter_name):
            value = value + curvature_penalty(peft_model, ekfac, config.teacher_adapter_name)
        value.backward()
        trainer.optimizer.zero_grad()

    step_s = _median_time(step, args.steps)
    penalty_s = _median_time(penalty, args.steps)
    report = {
        "settings": vars(args) | {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
        "estimation": estimation,
        "delta_step_s": step_s,
        "penalty_student_plus_teacher_s": penalty_s,
        "penalty_over_step": penalty_s / step_s,
        "penalty_share_of_step_with_penalty": penalty_s / (step_s + penalty_s),
        "num_layers": len(ekfac.layers),
    }
    print(f"\n{args.model}, LoRA q_proj/v_proj r=8, {len(ekfac.layers)} layers, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")  # fmt: skip
    print(f"{'estimation':<10} {'samples':>8} {'seconds':>9} {'s / 1k samples':>15} {'factors MiB':>12}")
    for name, row in estimation.items():
        print(f"{name:<10} {len(texts):>8} {row['seconds']:>9.2f} {row['seconds_per_1000_samples']:>15.1f} "
              f"{row['megabytes']:>12.2f}")  # fmt: skip
    print(f"\nDELTA step ({args.batch_size} x {args.max_length} tokens): {step_s:.3f} s; EK-FAC penalty fwd+bwd "
          f"(student + teacher): {penalty_s * 1000:.1f} ms = {100 * penalty_s / step_s:.1f}% of the step")  # fmt: skip
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2))
    print(f"written {args.output}")
    return report


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--num_samples", type=int, default=64)
    parser.add_argument("--max_length", type=int, default=64)
    parser.add_argument("--estimation_batch_size", type=int, default=8)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--output", default="bench/results/curvature_cost.json")
    return parser


if __name__ == "__main__":
    main(make_parser().parse_args())
