"""Cost of one DELTA training step against plain LoRA training, on the same model and batch, in one process.

    OMP_NUM_THREADS=1 python bench/step_cost.py --models embedded                       # SFT, batch 4 x 64
    OMP_NUM_THREADS=1 python bench/step_cost.py --objective dpo --models embedded --batch_size 2 --seq_len 256
    python bench/step_cost.py --models tiny embedded --steps 20 --trainers lora delta
    OMP_NUM_THREADS=1 python bench/step_cost.py --models embedded --trainers lora delta delta-fd delta-k4
    OMP_NUM_THREADS=1 python bench/step_cost.py --models embedded --gradient_checkpointing --trainers lora delta

`delta-fd` is `delta` with the finite-difference teacher tangent, `delta-k4` with the teacher on one step in 4 (the
global step advances after every timed step, so a `delta-k4` median over rounds mixes teacher and student-only steps
3:1); their ratio to exact `delta` is printed beside the ratio to LoRA.

SFT compares ``Seq2SeqTrainer`` + LoRA with ``DeltaTrainer``; DPO compares TRL's ``DPOTrainer`` + LoRA (policy and
reference forwards) with ``DeltaDPOTrainer`` (teacher pass whose primal is the reference + student forward).

Built for shared machines: every trainer of a model lives in the same process and the timed steps are interleaved
(A B C, B C A, ...), so that load from other processes hits every variant alike. Each step (``training_step`` +
optimizer step) is timed in wall-clock and in process CPU time (``time.process_time``, immune to being descheduled);
the table shows min / median / max and the median of the per-round ratios to LoRA. Peak memory is the peak of live
tracked allocations during one extra step per trainer (on CUDA ``torch.cuda.max_memory_allocated``; on CPU the
allocation/free events of the PyTorch profiler, summed in time order), over what was allocated before the step:
activations, gradients and temporaries, independent of the allocator's caching and of RSS. Writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path


TRAINERS = ("lora", "delta", "linear", "delta-fd", "delta-k4")
# opt-in cheaper teachers (docs/ARCHITECTURE.md, "Cheaper teachers"): DELTA with these extra DeltaArguments
CHEAPER = {"delta-fd": {"teacher_tangent": "fd"}, "delta-k4": {"teacher_every_k_steps": 4}}


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(c): i for i, c in enumerate(range(97, 123))} | {"<pad>": 26, "<eos>": 27}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def _build(args: argparse.Namespace, model_name: str, trainer_name: str):
    """(trainer, batch, num_items) for one variant, with its own copy of the model, on the benchmark's batch."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM, Seq2SeqTrainer, Seq2SeqTrainingArguments
    from trl import DPOConfig, DPOTrainer

    from delta_trl import DeltaConfig, DeltaDPOConfig, DeltaDPOTrainer, DeltaTrainer, load_model_and_tokenizer

    torch.manual_seed(0)
    tokenizer = None
    if model_name == "tiny":
        config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
        model = LlamaForCausalLM(config)
    else:
        model, tokenizer = load_model_and_tokenizer(model_name, attn_implementation="sdpa")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    vocab = model.config.vocab_size
    ids = torch.randint(10, vocab, (args.batch_size, args.seq_len), device=device)
    common = {"output_dir": "/tmp/delta_trl_bench", "report_to": "none", "use_cpu": device == "cpu",
              "bf16": args.bf16, "learning_rate": 1e-4, "max_steps": args.steps + args.warmup,
              "gradient_checkpointing": args.gradient_checkpointing}  # fmt: skip
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
        if trainer_name == "lora":
            trainer = Seq2SeqTrainer(model=get_peft_model(model, lora), args=Seq2SeqTrainingArguments(**common))
        else:
            config = DeltaConfig(delta_mode=trainer_name.split("-")[0], **CHEAPER.get(trainer_name, {}), **common)
            trainer = DeltaTrainer(model=model, args=config, peft_config=lora)
    else:
        # rows 0..B-1 chosen, B..2B-1 rejected: the collated layout of TRL's preference batches
        batch = {"input_ids": ids.repeat(2, 1), "attention_mask": torch.ones_like(ids).repeat(2, 1),
                 "completion_mask": completion.repeat(2, 1)}  # fmt: skip
        batch["input_ids"][args.batch_size :, args.seq_len // 2 :] = torch.randint_like(
            ids[:, args.seq_len // 2 :], 10, vocab
        )
        num_items = None
        tokenizer = tokenizer or _tiny_tokenizer()
        dpo = {"max_length": args.seq_len, **common}
        data = Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}] * 2)
        if trainer_name == "lora":
            trainer = DPOTrainer(model=model, args=DPOConfig(**dpo), train_dataset=data, processing_class=tokenizer,
                                 peft_config=lora)  # fmt: skip
        else:
            config = DeltaDPOConfig(delta_mode=trainer_name.split("-")[0], **CHEAPER.get(trainer_name, {}), **dpo)
            trainer = DeltaDPOTrainer(model=model, args=config,
                                      train_dataset=data, processing_class=tokenizer, peft_config=lora)  # fmt: skip
    if args.gradient_checkpointing:  # what `Trainer.train()` does, which the benchmark bypasses
        trainer.model.activation_checkpointing_enable()
    trainer.create_optimizer_and_scheduler(num_training_steps=10**6)
    trainer.current_gradient_accumulation_steps = 1  # set by `train()`, which the benchmark bypasses
    trainer.model.to(device)
    return trainer, batch, num_items


def _step(trainer, batch, num_items) -> None:
    trainer.training_step(trainer.model, batch, num_items)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad()
    trainer.state.global_step += 1  # as `train()` does: α and `teacher_every_k_steps` read it


def _timed_step(trainer, batch, num_items, cuda: bool) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one step."""
    import torch

    wall, cpu = time.perf_counter(), time.process_time()
    _step(trainer, batch, num_items)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


def _peak_step_memory(trainer, batch, num_items, cuda: bool) -> int:
    """Peak of live tracked allocations during one step, over those live before it (bytes)."""
    import torch

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        _step(trainer, batch, num_items)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _step(trainer, batch, num_items)
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def _summary(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def run_model(args: argparse.Namespace, model_name: str) -> list[dict]:
    """Every trainer of one model in this process; timed steps interleaved, rotating the order each round."""
    import torch

    cuda = torch.cuda.is_available()
    built = {name: _build(args, model_name, name) for name in args.trainers}
    for name, variant in built.items():
        print(f"  warm-up {model_name} / {name}", flush=True)
        for _ in range(args.warmup):
            _step(*variant)
    wall: dict[str, list[float]] = {name: [] for name in built}
    cpu: dict[str, list[float]] = {name: [] for name in built}
    names = list(built)
    for round_ in range(args.steps):
        order = names[round_ % len(names) :] + names[: round_ % len(names)]
        for name in order:
            w, c = _timed_step(*built[name], cuda)
            wall[name].append(w)
            cpu[name].append(c)
        print(f"  round {round_ + 1}/{args.steps}: " + ", ".join(f"{n} {cpu[n][-1]:.2f}s" for n in names), flush=True)
    memory = {name: _peak_step_memory(*variant, cuda) for name, variant in built.items()}
    rows = []
    reference = "lora" if "lora" in built else names[0]
    for name in names:
        row = {"objective": args.objective, "model": model_name, "trainer": name, "device": "cuda" if cuda else "cpu",
               "wall_s": _summary(wall[name]), "cpu_s": _summary(cpu[name]), "wall_steps_s": wall[name],
               "cpu_steps_s": cpu[name], "peak_memory_bytes": memory[name]}  # fmt: skip
        for kind, times in (("wall", wall), ("cpu", cpu)):
            ratios = [a / b for a, b in zip(times[name], times[reference], strict=True)]
            row[f"{kind}_ratio"] = _summary(ratios)
        row["memory_ratio"] = memory[name] / max(memory[reference], 1)
        if "delta" in built:
            row["cpu_ratio_to_delta"] = _summary([a / b for a, b in zip(cpu[name], cpu["delta"], strict=True)])
        rows.append(row)
    return rows


def main(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    rows = []
    for model_name in args.models:
        print(f"running {args.objective}: {model_name} / {', '.join(args.trainers)} ...", flush=True)
        rows += run_model(args, model_name)
    print(f"\n{args.objective}: batch {args.batch_size} x {args.seq_len} tokens ({'pairs' if args.objective == 'dpo' else 'rows'}), "
          f"{args.steps} interleaved rounds after {args.warmup} warm-up steps, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}; ratios: median of per-round ratios to LoRA [min, max]")  # fmt: skip
    print(f"{'model':<10} {'trainer':<9} {'CPU s min/med/max':>20} {'CPU x LoRA':>20} {'wall s med':>10} "
          f"{'wall x LoRA':>20} {'peak MiB':>9} {'mem x LoRA':>10} {'CPU x delta':>20}")  # fmt: skip
    for r in rows:
        c, w, cr, wr = r["cpu_s"], r["wall_s"], r["cpu_ratio"], r["wall_ratio"]
        d = r.get("cpu_ratio_to_delta")
        to_delta = f"{d['median']:>6.2f} [{d['min']:.2f}, {d['max']:.2f}]" if d else ""
        print(f"{r['model']:<10} {r['trainer']:<9} {c['min']:>6.2f}/{c['median']:>6.2f}/{c['max']:>6.2f} "
              f"{cr['median']:>6.2f} [{cr['min']:.2f}, {cr['max']:.2f}] {w['median']:>10.2f} "
              f"{wr['median']:>6.2f} [{wr['min']:.2f}, {wr['max']:.2f}] {r['peak_memory_bytes'] / 2**20:>9.1f} "
              f"{r['memory_ratio']:>10.2f} {to_delta:>20}")  # fmt: skip
    report = {"settings": vars(args), "results": rows}
    suffix = "_checkpointing" if args.gradient_checkpointing else ""
    output = Path(args.output or f"bench/results/step_cost_{args.objective}{suffix}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2))
    print(f"\nwritten {output}")
    return report


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objective", choices=("sft", "dpo"), default="sft", help="SFT (DeltaTrainer) or DPO")
    parser.add_argument("--models", nargs="+", default=["tiny", "embedded"], help="`tiny`, `embedded` or model ids")
    parser.add_argument("--trainers", nargs="+", choices=TRAINERS, default=list(TRAINERS))
    parser.add_argument("--steps", type=int, default=10, help="interleaved timed rounds (one step per trainer each)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=4, help="rows (SFT) or preference pairs (DPO)")
    parser.add_argument("--seq_len", type=int, default=64)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU only: ~10x slower on CPUs)")
    parser.add_argument(
        "--gradient_checkpointing", action="store_true", help="activation checkpointing on, for every variant alike"
    )
    parser.add_argument(
        "--output", default=None, help="default: bench/results/step_cost_<objective>[_checkpointing].json"
    )
    return parser


if __name__ == "__main__":
    main(make_parser().parse_args())
