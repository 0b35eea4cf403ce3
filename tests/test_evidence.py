"""bench/evidence.py aggregates finished seeds: means and spreads computed by hand."""

import importlib.util
import json
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("evidence", ROOT / "bench" / "evidence.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _results(individual, one, best, alpha):
    merged = {"mean_absolute": one[0], "mean_normalized": one[1]}
    chosen = {"alpha": alpha, "mean_absolute": best[0], "mean_normalized": best[1]}
    return {"individual": individual, "merged_alpha_1": merged, "merged_best": chosen}


def test_summary_means_and_spreads_over_seeds(tmp_path):
    evidence = _module()
    runs = {
        "seed0": {"a": _results({"t1": 0.8, "t2": 0.6}, (0.5, 0.7), (0.6, 0.8), 0.4)},
        "seed1": {"a": _results({"t1": 1.0, "t2": 0.8}, (0.7, 0.9), (0.8, 1.0), 0.6)},
    }
    for seed, methods in runs.items():
        (tmp_path / seed).mkdir()
        zero = {"t1": 0.2, "t2": 0.4} if seed == "seed0" else {"t1": 0.4, "t2": 0.4}
        (tmp_path / seed / "results.json").write_text(json.dumps({"zero_shot": zero, "methods": methods}))
    summary = evidence.summarize([tmp_path / "seed0", tmp_path / "seed1", tmp_path / "seed2"])  # seed2 unfinished
    assert summary["seeds"] == ["seed0", "seed1"]
    assert summary["zero_shot"]["mean"] == pytest.approx(0.35)
    a = summary["methods"]["a"]
    assert a["individual"] == pytest.approx({"mean": 0.8, "min": 0.7, "max": 0.9, "n": 2})
    assert a["alpha_1_normalized"] == pytest.approx({"mean": 0.8, "min": 0.7, "max": 0.9, "n": 2})
    assert a["best_alpha"]["mean"] == pytest.approx(0.5)
    # gain kept: seed0 (0.5 - 0.3) / (0.7 - 0.3) = 0.5, seed1 (0.7 - 0.4) / (0.9 - 0.4) = 0.6
    assert a["alpha_1_gain_kept"] == pytest.approx({"mean": 0.55, "min": 0.5, "max": 0.6, "n": 2})
    # at α*: (0.6 - 0.3) / 0.4 = 0.75 and (0.8 - 0.4) / 0.5 = 0.8
    assert a["best_gain_kept"] == pytest.approx({"mean": 0.775, "min": 0.75, "max": 0.8, "n": 2})
    assert "| a | 0.800 (0.700–0.900) |" in evidence.markdown(summary)
    with pytest.raises(SystemExit, match="no finished seed"):
        evidence.summarize([tmp_path / "none"])


def test_per_task_table_averages_seeds(tmp_path):
    evidence = _module()
    for seed, (ind, one, best) in enumerate([(0.8, 0.4, 0.6), (1.0, 0.6, 0.8)]):
        folder = tmp_path / f"seed{seed}"
        folder.mkdir()
        method = {"individual": {"t": ind}, "merged_alpha_1": {"per_task": {"t": one}},
                  "merged_best": {"per_task": {"t": best}}}  # fmt: skip
        results = {"tasks": ["t"], "zero_shot": {"t": 0.25}, "methods": {"a": method}}
        (folder / "results.json").write_text(json.dumps(results))
    table = evidence.per_task([tmp_path / "seed0", tmp_path / "seed1"])
    assert table["a"]["t"] == pytest.approx({"zero_shot": 0.25, "individual": 0.9, "alpha_1": 0.5, "best": 0.7,
                                             "seeds": 2})  # fmt: skip
    assert "| a | t | 0.250 | 0.900 | 0.500 | 0.700 |" in evidence.per_task_markdown(table)


def test_validation_curves_average_seeds_per_alpha(tmp_path):
    evidence = _module()
    for seed, curve in enumerate([[0.6, 0.8, 0.5], [0.8, 0.6, 0.7]]):
        folder = tmp_path / f"seed{seed}"
        folder.mkdir()
        method = {"validation": {"alphas": [0.5, 1.0, 1.5], "mean_normalized": curve}}
        (folder / "results.json").write_text(json.dumps({"methods": {"a": method}}))
    curves = evidence.validation_curves([tmp_path / "seed0", tmp_path / "seed1"])
    assert curves["a"]["alphas"] == [0.5, 1.0, 1.5]
    assert curves["a"]["mean"] == pytest.approx([0.7, 0.7, 0.6])
    assert curves["a"]["min"] == pytest.approx([0.6, 0.6, 0.5])
    assert curves["a"]["max"] == pytest.approx([0.8, 0.8, 0.7])
    (tmp_path / "seed1" / "results.json").write_text(
        json.dumps({"methods": {"a": {"validation": {"alphas": [0.5, 1.0], "mean_normalized": [0.1, 0.2]}}}})
    )
    with pytest.raises(SystemExit, match="different α grids"):
        evidence.validation_curves([tmp_path / "seed0", tmp_path / "seed1"])
