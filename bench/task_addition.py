"""End-to-end task addition on the embedded model: train two task vectors per method, add them, sweep α.

    OMP_NUM_THREADS=2 python bench/task_addition.py                  # delta vs nonlinear, ~12 min on 2 CPU cores
    python bench/task_addition.py --modes delta nonlinear linear --steps 60

Two synthetic tagging tasks the base model cannot know: reviews tagged " sunny"/" rainy" by sentiment (the recipe's
built-in task) and objects tagged " meadow"/" highway" (animal or vehicle). For each `delta_mode`, it trains both with
`delta-trl sft` (recipes/sft_delta.py) and runs `delta-trl evaluate` on θ0 + α(τ_a + τ_b), then prints the mean normalized accuracy
at α = 1 and at the best α. A small, synthetic check of the whole pipeline, not a reproduction of the paper's tables.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]


def _write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def make_tasks(folder: Path, n_train: int = 320, n_val: int = 80) -> None:
    from delta_trl.experiment.tasks import builtin_objects  # the word lists and templates live there
    from delta_trl.scripts.sft import builtin_sentiment

    reviews = [dict(r) for r in builtin_sentiment(n_train + n_val, seed=1)]
    objects = builtin_objects(n_train + n_val, seed=2)
    for name, rows in (("a", reviews), ("b", objects)):
        _write(folder / f"{name}_train.jsonl", rows[:n_train])
        _write(
            folder / f"{name}_val.jsonl",
            [{"text": r["prompt"], "label": r["completion"].strip()} for r in rows[n_train:]],
        )


def main(args: argparse.Namespace) -> dict:
    folder = Path(args.output)
    folder.mkdir(parents=True, exist_ok=False)
    make_tasks(folder)
    base_model = args.model
    if base_model == "embedded":
        from delta_trl.embedded import prepare_embedded_model

        base_model = str(prepare_embedded_model())
    summary = {}
    for mode in args.modes:
        for task in ("a", "b"):
            print(f"training {mode} / task {task} ...", flush=True)
            subprocess.run([sys.executable, "-m", "delta_trl.cli", "sft", "--config", args.config,
                            "--dataset_name", str(folder / f"{task}_train.jsonl"), "--delta_mode", mode,
                            "--max_steps", str(args.steps), "--output_dir", str(folder / f"{mode}_{task}"),
                            "--model_name_or_path", args.model,
                            "--disable_tqdm", "true"], check=True, capture_output=True)  # fmt: skip
        subprocess.run([sys.executable, "-m", "delta_trl.cli", "evaluate", "--base-model", base_model,
                        "--adapter", f"a={folder / f'{mode}_a'}", "--adapter", f"b={folder / f'{mode}_b'}",
                        "--data", f"a={folder / 'a_val.jsonl'}", "--data", f"b={folder / 'b_val.jsonl'}",
                        "--alphas", *map(str, args.alphas), "--output", str(folder / f"eval_{mode}")],
                       check=True, capture_output=True)  # fmt: skip
        sweep = json.loads((folder / f"eval_{mode}" / "alpha_sweep.json").read_text())
        summary[mode] = {k: sweep[k] for k in ("alpha_one_normalized", "best_alpha", "best_normalized")}
    print(f"\n{'mode':<12} {'norm. acc. at α=1':>18} {'best α':>7} {'norm. acc. at best α':>21}")
    for mode, row in summary.items():
        print(
            f"{mode:<12} {row['alpha_one_normalized']:>18.3f} {row['best_alpha']:>7g} {row['best_normalized']:>21.3f}"
        )
    (folder / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nplots: {folder}/eval_*/alpha_sweep.png, summary: {folder / 'summary.json'}")
    return summary


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", default=["delta", "nonlinear"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.2, 0.4, 0.6, 0.8, 1.0, 1.2])
    parser.add_argument("--config", default=str(ROOT / "recipes" / "configs" / "sft_delta.yaml"))
    parser.add_argument("--model", default="embedded", help="`embedded`, a local folder or a Hub id")
    parser.add_argument("--output", default="bench/results/task_addition", help="new folder for data and results")
    return parser


if __name__ == "__main__":
    main(make_parser().parse_args())
