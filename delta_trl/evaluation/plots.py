"""PNG figures for the diagnostics in :mod:`delta_trl.evaluation.diagnostics`, readable without the code.

matplotlib is imported inside each function with the non-interactive Agg backend, so importing delta_trl never needs
a display or matplotlib itself (it is the optional ``plots`` extra).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def _pyplot():
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError("Diagnostics figures need matplotlib: pip install 'delta_trl[plots]'.") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def plot_disentanglement(result: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Heat map of ξ(α1, α2) with α1 on x, α2 on y; 0 (dark) means the two task vectors do not interfere."""
    plt = _pyplot()
    t1, t2 = result["tasks"]
    a1, a2, xi = result["alphas_1"], result["alphas_2"], result["xi"]
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    # xi[i][j] is at (α1 = a1[i], α2 = a2[j]); imshow wants rows = y.
    rows = [[xi[i][j] for i in range(len(a1))] for j in range(len(a2))]
    image = ax.imshow(
        rows,
        origin="lower",
        aspect="auto",
        cmap="viridis",
        vmin=0.0,
        vmax=max(0.01, *(v for row in xi for v in row)),
        extent=_extent(a1, a2),
        interpolation="nearest",
    )
    fig.colorbar(image, ax=ax, label="ξ: disagreement rate summed over both tasks (0 = disentangled)")
    ax.set_xlabel(f"α1 (coefficient of τ_{t1})")
    ax.set_ylabel(f"α2 (coefficient of τ_{t2})")
    ax.set_title(f"Weight disentanglement error ξ(α1, α2)\n{t1} + {t2}")
    return _save(fig, path)


def _extent(a1: list[float], a2: list[float]) -> list[float]:
    """Pixel edges so each cell is centred on its α (grids are assumed evenly spaced)."""

    def edges(values: list[float]) -> tuple[float, float]:
        half = (values[1] - values[0]) / 2 if len(values) > 1 else 0.5
        return values[0] - half, values[-1] + half

    return [*edges(a1), *edges(a2)]


def plot_alpha_sweep(result: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Normalized accuracy per task and their mean against α, with the best α and α = 1 marked."""
    plt = _pyplot()
    alphas = result["alphas"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for task, ref in result["reference"].items():
        ax.plot(alphas, [s[task] / ref for s in result["per_task"]], marker=".", alpha=0.6, label=task)
    ax.plot(alphas, result["normalized"], marker="o", color="black", linewidth=2, label="mean")
    ax.axvline(result["best_alpha"], color="tab:red", linestyle="--", label=f"best α = {result['best_alpha']:g}")
    ax.axvline(1.0, color="gray", linestyle=":", label=f"α = 1 (mean {result['alpha_one_normalized']:.3f})")
    ax.set_xlabel("α (θ0 + α·Σ_t τ_t)")
    ax.set_ylabel("accuracy / fine-tuned accuracy")
    ax.set_title("Task addition: normalized accuracy vs α")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_negation(result: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Target and control accuracy of θ0 − α·τ against α, the control floor, and the chosen α."""
    plt = _pyplot()
    alphas = result["alphas"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(alphas, result["target"], marker="o", label="target task (lower = forgotten)")
    ax.plot(alphas, result["control"], marker="s", label="control task")
    floor = result["threshold"] * result["base_control"]
    ax.axhline(floor, color="gray", linestyle=":", label=f"control floor = {result['threshold']:g} × θ0 ({floor:.3f})")
    ax.axvline(result["best_alpha"], color="tab:red", linestyle="--", label=f"chosen α = {result['best_alpha']:g}")
    ax.set_xlabel("α (θ0 − α·τ_target)")
    ax.set_ylabel("accuracy")
    ax.set_title("Task negation: accuracy vs α")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_linearization_error(result: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Relative linearization error of one adapter along α (0 = the network is linear in its task vector)."""
    plt = _pyplot()
    points = [(a, e) for a, e in zip(result["alphas"], result["relative_error"], strict=True) if e is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([a for a, _ in points], [e for _, e in points], marker="o")
    ax.set_xlabel("α (θ0 + α·τ)")
    ax.set_ylabel("E‖z(α) − f_lin(α)‖² / E‖z(α) − f(θ0)‖²")
    ax.set_title(f"Linearization error of adapter {result['adapter']!r}")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_dpo_front(result: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Left: helpfulness vs verbosity as λ2 varies; right: preference accuracy and response length vs λ2."""
    plt = _pyplot()
    lambdas = result["lambdas"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    left.plot(result["verbosity"], result["helpfulness"], marker="o")
    for lam, x, y in zip(lambdas, result["verbosity"], result["helpfulness"], strict=True):
        left.annotate(f"λ2={lam:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    left.set_xlabel("verbosity score")
    left.set_ylabel("helpfulness score")
    left.set_title("θ0 + τ_help + λ2·τ_verb: reward front")
    left.grid(alpha=0.3)
    for objective, values in result["preference_accuracy"].items():
        right.plot(lambdas, values, marker="o", label=f"preference accuracy ({objective})")
    right.set_xlabel("λ2 (coefficient of τ_verb)")
    right.set_ylabel("preference accuracy (margin > 0)")
    right.set_ylim(-0.05, 1.05)
    right.grid(alpha=0.3)
    length_axis = right.twinx()
    length_axis.plot(lambdas, result["mean_response_length"], color="gray", linestyle="--", label="mean length")
    length_axis.set_ylabel("mean response length (tokens)")
    lines = right.get_legend_handles_labels()
    more = length_axis.get_legend_handles_labels()
    right.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, loc="best")
    right.set_title("Preference accuracy and length vs λ2")
    return _save(fig, path)


def plot_coefficient_front(result: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """The score of the second task against the first's as λ varies in θ0 + τ_1 + λ·τ_2, each point labelled."""
    plt = _pyplot()
    first, second = result["first"], result["second"]
    xs, ys = result["score"][second], result["score"][first]
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ax.plot(xs, ys, marker="o")
    for lam, x, y in zip(result["coefficients"], xs, ys, strict=True):
        ax.annotate(f"λ={lam:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(f"{second} score")
    ax.set_ylabel(f"{first} score")
    ax.set_title(f"θ0 + τ_{first} + λ·τ_{second}: front")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_method_curves(curves: Mapping[str, Mapping[str, Any]], path: str | os.PathLike, title: str) -> Path:
    """One line per method: mean normalized accuracy against α, with the min–max band over seeds.

    ``curves[method]`` holds ``alphas``, ``mean``, ``min`` and ``max`` (equal lengths), e.g. the validation curves of
    several seeds of an experiment (``bench/evidence.py``).
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, curve in curves.items():
        (line,) = ax.plot(curve["alphas"], curve["mean"], marker="o", label=method)
        ax.fill_between(curve["alphas"], curve["min"], curve["max"], color=line.get_color(), alpha=0.2)
    ax.set_xlabel("α (θ0 + α·Σ_t τ_t)")
    ax.set_ylabel("merged accuracy / individual accuracy")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)
