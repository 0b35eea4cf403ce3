"""Choosing the task-arithmetic coefficient α on a validation split, as in the paper (Sommariva et al., ICML 2026,
arXiv 2605.18993; docs/MERGING.md §2).

- Addition: evaluate ``θ0 + α·Σ_t τ_t`` over a grid and keep the α maximising the *mean normalized accuracy*
  ``(1/T)·Σ_t acc_t(θ0 + α·Σ τ) / acc_t(θ0 + τ_t)`` (each task relative to its own fine-tuned model). α = 1 is always
  reported too.
- Negation: for a target task, evaluate ``θ0 − α·τ_target`` and keep the α minimising the target accuracy among those
  whose control accuracy is at least ``threshold`` (95%) of the pre-trained model's. α = 0 (the pre-trained model) is
  always evaluated, so a feasible α exists.

The selection functions take an ``evaluate(α)`` callable, so any metric can be plugged in; :func:`addition_sweep` and
:func:`negation_sweep` build it from :func:`delta_trl.evaluation.scoring.evaluate_tasks`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from delta_trl.evaluation.scoring import ClassificationSet, Metric, accuracy, evaluate_tasks


@dataclass(frozen=True)
class AlphaSelection:
    """Result of the addition grid search (all lists are aligned with ``alphas``)."""

    alphas: list[float]
    per_task: list[dict[str, float]]
    normalized: list[float]
    reference: dict[str, float]
    best_alpha: float
    best_normalized: float
    alpha_one_normalized: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class NegationSelection:
    """Result of the negation grid search for one target task (lists aligned with ``alphas``)."""

    alphas: list[float]
    target: list[float]
    control: list[float]
    base_control: float
    threshold: float
    best_alpha: float
    best_target: float
    best_control: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_grid(alphas: Sequence[float]) -> list[float]:
    grid = [float(a) for a in alphas]
    if not grid:
        raise ValueError("The α grid is empty; give at least one coefficient (e.g. 0.1 0.2 … 1.0).")
    if any(a != a or a in (float("inf"), float("-inf")) for a in grid):
        raise ValueError(f"The α grid must contain finite numbers; got {grid}.")
    return grid


def select_alpha(
    evaluate: Callable[[float], Mapping[str, float]], alphas: Sequence[float], reference: Mapping[str, float]
) -> AlphaSelection:
    """Grid search of the addition coefficient by mean normalized accuracy.

    Args:
        evaluate: ``α ↦ {task: metric of θ0 + α·Σ_t τ_t on task's validation split}``.
        alphas: the grid; ties go to the first α in grid order.
        reference: ``{task: metric of task's own fine-tuned model}``, the normalisers (must be > 0).

    Returns:
        :class:`AlphaSelection` with per-α per-task scores, ``normalized[i] = mean_t score_t / reference_t``, the
        best α and the normalized score at α = 1 (evaluated even if 1 is not in the grid).
    """
    grid = _check_grid(alphas)
    bad = {t: v for t, v in reference.items() if not v > 0}
    if bad:
        raise ValueError(f"Reference (fine-tuned) scores must be > 0 to normalize by them; got {bad}.")

    def normalized(scores: Mapping[str, float]) -> float:
        missing = set(reference) - set(scores)
        if missing:
            raise ValueError(f"evaluate(α) returned no score for task(s) {sorted(missing)}.")
        return sum(scores[t] / reference[t] for t in reference) / len(reference)

    per_task = [dict(evaluate(a)) for a in grid]
    norm = [normalized(s) for s in per_task]
    best = max(range(len(grid)), key=lambda i: (norm[i], -i))
    at_one = norm[grid.index(1.0)] if 1.0 in grid else normalized(evaluate(1.0))
    return AlphaSelection(grid, per_task, norm, dict(reference), grid[best], norm[best], at_one)


def select_negation_alpha(
    evaluate: Callable[[float], tuple[float, float]],
    alphas: Sequence[float],
    base_control: float,
    threshold: float = 0.95,
) -> NegationSelection:
    """Pick the negation coefficient: ``argmin_α target(α)`` subject to ``control(α) ≥ threshold·base_control``.

    Args:
        evaluate: ``α ↦ (target accuracy, control accuracy)`` of ``θ0 − α·τ_target``.
        alphas: the grid (α = 0 is added: the pre-trained model always satisfies the constraint).
        base_control: control accuracy of the pre-trained model θ0.
        threshold: the fraction of ``base_control`` to keep.
    """
    grid = _check_grid(alphas)
    if 0.0 not in grid:
        grid = [0.0, *grid]
    results = [evaluate(a) for a in grid]
    target = [float(t) for t, _ in results]
    control = [float(c) for _, c in results]
    floor = threshold * base_control
    feasible = [i for i in range(len(grid)) if control[i] >= floor or grid[i] == 0.0]
    best = min(feasible, key=lambda i: (target[i], i))
    return NegationSelection(grid, target, control, base_control, threshold, grid[best], target[best], control[best])


def addition_sweep(
    model: torch.nn.Module,
    tokenizer: Any,
    datasets: Mapping[str, ClassificationSet],
    alphas: Sequence[float],
    *,
    linearized: bool = False,
    metric: Metric = accuracy,
    reference: Mapping[str, float] | None = None,
    batch_size: int = 16,
) -> AlphaSelection:
    """:func:`select_alpha` for a model carrying one adapter per task, named like the keys of ``datasets``.

    The merged model at α is ``θ0 + α·Σ_t τ_t`` (all adapter scalings times α); the reference for task t is the model
    with only adapter t at scaling 1, unless ``reference`` is given.
    """
    _check_grid(alphas)
    tasks = list(datasets)

    def run(factors: Mapping[str, float], subset: Mapping[str, ClassificationSet]) -> dict[str, float]:
        return evaluate_tasks(
            model, tokenizer, subset, factors, linearized=linearized, metric=metric, batch_size=batch_size
        )

    if reference is None:
        reference = {t: run({t: 1.0}, {t: datasets[t]})[t] for t in tasks}
    return select_alpha(lambda a: run(dict.fromkeys(tasks, a), datasets), alphas, reference)


def negation_sweep(
    model: torch.nn.Module,
    tokenizer: Any,
    target_task: str,
    target: ClassificationSet,
    control: ClassificationSet,
    alphas: Sequence[float],
    *,
    linearized: bool = False,
    metric: Metric = accuracy,
    threshold: float = 0.95,
    batch_size: int = 16,
) -> NegationSelection:
    """:func:`select_negation_alpha` for ``θ0 − α·τ`` of the adapter named ``target_task``."""
    data = {"target": target, "control": control}

    def run(alpha: float) -> dict[str, float]:
        return evaluate_tasks(
            model, tokenizer, data, {target_task: -alpha}, linearized=linearized, metric=metric, batch_size=batch_size
        )

    base_control = run(0.0)["control"]

    def evaluate(alpha: float) -> tuple[float, float]:
        scores = run(alpha)
        return scores["target"], scores["control"]

    return select_negation_alpha(evaluate, alphas, base_control, threshold)
