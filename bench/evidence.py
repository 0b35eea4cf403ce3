"""The evidence study: `delta-trl experiment` over the real-language tasks for several seeds, aggregated.

    python bench/data/build_tasks.py                                   # once: the tasks (see its docstring)
    OMP_NUM_THREADS=1 python bench/evidence.py                         # seeds 0 1 2, runs/evidence/seed<N>
    python bench/evidence.py --seeds 0 --methods nonlinear delta --set training.distill_weight=3
    python bench/evidence.py --summarize-only                          # re-aggregate finished seeds

Each seed is one experiment folder (resumable: a rerun reuses every finished task vector and evaluation). The
summary (``summary.json``, ``summary.md`` in ``--output``) gives, per method, the mean and the spread (min–max) over
seeds of: the mean individual accuracy, and the merged model's mean absolute and mean normalized accuracy and the
share of the gain over zero-shot it keeps (:func:`gain_kept`), at α = 1 and at the α chosen on validation. Every
number is a test-split accuracy; nothing is tuned on test. ``validation_curves.png`` plots each method's validation
curve (the one α* is chosen on), mean and min–max over seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any


ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "recipes" / "configs" / "experiments" / "real_tasks_embedded.yaml"


def gain_kept(run: dict[str, Any], method: str, merged: str) -> float:
    """Share of the fine-tuning gain over zero-shot that the merge keeps, on the task means:
    ``(mean merged − mean zero-shot) / (mean individual − mean zero-shot)``. Normalized accuracy divides by the
    individual accuracy alone, so a merge that falls back to zero-shot still scores ``zero-shot / individual``
    (0.7 here); this is 0 for it, 1 for a merge as good as each vector alone."""
    zero = statistics.mean(run["zero_shot"].values())
    result = run["methods"][method]
    individual = statistics.mean(result["individual"].values())
    return (result[merged]["mean_absolute"] - zero) / (individual - zero)


# name -> metric of (run, method): each is a test-split figure of one seed
METRICS = {
    "individual": lambda run, m: statistics.mean(run["methods"][m]["individual"].values()),
    "alpha_1_absolute": lambda run, m: run["methods"][m]["merged_alpha_1"]["mean_absolute"],
    "alpha_1_normalized": lambda run, m: run["methods"][m]["merged_alpha_1"]["mean_normalized"],
    "alpha_1_gain_kept": lambda run, m: gain_kept(run, m, "merged_alpha_1"),
    "best_alpha": lambda run, m: run["methods"][m]["merged_best"]["alpha"],
    "best_absolute": lambda run, m: run["methods"][m]["merged_best"]["mean_absolute"],
    "best_normalized": lambda run, m: run["methods"][m]["merged_best"]["mean_normalized"],
    "best_gain_kept": lambda run, m: gain_kept(run, m, "merged_best"),
}


def finished_runs(folders: list[Path]) -> dict[str, dict[str, Any]]:
    """``results.json`` of every seed folder that has one, by folder name (a seed still running is left out)."""
    runs = {f.name: json.loads((f / "results.json").read_text()) for f in folders if (f / "results.json").is_file()}
    if not runs:
        raise SystemExit("error: no finished seed (results.json) to summarize")
    return runs


def spread(values: list[float]) -> dict[str, float]:
    """Mean, min and max of one figure over seeds, and how many seeds gave it."""
    return {"mean": statistics.mean(values), "min": min(values), "max": max(values), "n": len(values)}


def summarize(folders: list[Path]) -> dict[str, Any]:
    """Mean, min and max over seeds of each metric per method (seeds whose results.json exists)."""
    runs = finished_runs(folders)
    methods = list(next(iter(runs.values()))["methods"])
    summary: dict[str, Any] = {"seeds": sorted(runs), "methods": {}}
    summary["zero_shot"] = spread([statistics.mean(r["zero_shot"].values()) for r in runs.values()])
    for method in methods:
        rows = [r for r in runs.values() if method in r["methods"]]
        summary["methods"][method] = {
            name: spread([metric(r, method) for r in rows]) for name, metric in METRICS.items()
        }
    return summary


def per_task(folders: list[Path]) -> dict[str, Any]:
    """Per method and task, the mean over finished seeds of the zero-shot, individual, merged α = 1 and merged α*
    test accuracies."""
    runs = list(finished_runs(folders).values())
    table: dict[str, Any] = {}
    for method in runs[0]["methods"]:
        rows = [r for r in runs if method in r["methods"]]
        table[method] = {
            task: {
                "zero_shot": statistics.mean(r["zero_shot"][task] for r in rows),
                "individual": statistics.mean(r["methods"][method]["individual"][task] for r in rows),
                "alpha_1": statistics.mean(r["methods"][method]["merged_alpha_1"]["per_task"][task] for r in rows),
                "best": statistics.mean(r["methods"][method]["merged_best"]["per_task"][task] for r in rows),
                "seeds": len(rows),
            }
            for task in rows[0]["tasks"]
        }
    return table


def per_task_markdown(table: dict[str, Any]) -> str:
    lines = ["| method | task | zero-shot | individual | merged α = 1 | merged α* |", "|---|---|---|---|---|---|"]
    for method, tasks in table.items():
        for task, v in tasks.items():
            lines.append(f"| {method} | {task} | {v['zero_shot']:.3f} | {v['individual']:.3f} | {v['alpha_1']:.3f} "
                         f"| {v['best']:.3f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def validation_curves(folders: list[Path]) -> dict[str, dict[str, list[float]]]:
    """Per method, the mean normalized *validation* accuracy of the merge at each α of the grid (the curve α* is
    chosen on): mean, min and max over finished seeds."""
    runs = list(finished_runs(folders).values())
    curves: dict[str, dict[str, list[float]]] = {}
    for method in runs[0]["methods"]:
        rows = [r["methods"][method]["validation"] for r in runs if method in r["methods"]]
        alphas = rows[0]["alphas"]
        if any(row["alphas"] != alphas for row in rows):
            raise SystemExit(f"error: the seeds of `{method}` were evaluated on different α grids")
        per_alpha = [spread(list(c)) for c in zip(*(row["mean_normalized"] for row in rows), strict=True)]
        curves[method] = {"alphas": alphas, **{stat: [a[stat] for a in per_alpha] for stat in ("mean", "min", "max")}}
    return curves


def markdown(summary: dict[str, Any]) -> str:
    def cell(stat: dict[str, float]) -> str:
        if stat["n"] == 1:
            return f"{stat['mean']:.3f}"
        return f"{stat['mean']:.3f} ({stat['min']:.3f}–{stat['max']:.3f})"

    lines = [
        f"Seeds: {', '.join(summary['seeds'])}; mean (min–max) over seeds. Zero-shot mean accuracy "
        f"{summary['zero_shot']['mean']:.3f}.",
        "",
        "| method | individual | merged α = 1: abs. | norm. | gain kept | α* | merged α*: abs. | norm. | gain kept |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method, s in summary["methods"].items():
        lines.append(
            f"| {method} | {cell(s['individual'])} | {cell(s['alpha_1_absolute'])} | {cell(s['alpha_1_normalized'])} "
            f"| {cell(s['alpha_1_gain_kept'])} | {cell(s['best_alpha'])} | {cell(s['best_absolute'])} "
            f"| {cell(s['best_normalized'])} | {cell(s['best_gain_kept'])} |"
        )
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> dict[str, Any]:
    output = Path(args.output)
    folders = [output / f"seed{seed}" for seed in args.seeds]
    if not args.summarize_only:
        from delta_trl.experiment.config import load_config
        from delta_trl.experiment.runner import run_experiment

        for seed, folder in zip(args.seeds, folders, strict=True):
            overrides = [f"seed={seed}", f"output_dir={folder}", f"methods=[{', '.join(args.methods)}]", *args.set]
            print(f"=== seed {seed} -> {folder}", flush=True)
            run_experiment(load_config(args.config, overrides))
    summary = summarize(folders)
    output.mkdir(parents=True, exist_ok=True)
    (output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    text = markdown(summary) + "\n" + per_task_markdown(per_task(folders))
    (output / "summary.md").write_text(text)
    print(text)
    if args.plot:
        from delta_trl.evaluation.plots import plot_method_curves

        seeds = ", ".join(summary["seeds"])
        plot_method_curves(validation_curves(folders), output / "validation_curves.png",
                           f"Merge of the task vectors, validation ({seeds})")  # fmt: skip
        print(f"written {output / 'validation_curves.png'}")
    return summary


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(CONFIG))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=["nonlinear", "linear", "delta"])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override the config")
    parser.add_argument("--output", default="runs/evidence", help="folder of the seed folders and the summary")
    parser.add_argument("--summarize-only", action="store_true", help="aggregate finished seeds, train nothing")
    parser.add_argument(
        "--no-plot",
        dest="plot",
        action="store_false",
        help="skip validation_curves.png (the merge's validation curve per method; needs matplotlib)",
    )
    return parser


if __name__ == "__main__":
    main(make_parser().parse_args())
