"""Metrics computed through 🤗 ``evaluate`` from a metric module shipped in this package (no Hub needed)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any


TASK_ACCURACY = Path(__file__).parent / "task_accuracy"


@functools.cache
def task_accuracy_metric() -> Any:
    """The ``task_accuracy`` metric (``evaluate.EvaluationModule``), loaded once from the package folder."""
    import evaluate

    return evaluate.load(str(TASK_ACCURACY))


def _check_lengths(predictions: Sequence[Any], references: Sequence[Any]) -> None:
    if not predictions or len(predictions) != len(references):
        raise ValueError(
            f"A metric needs as many references as predictions, at least one: got {len(predictions)} predictions and "
            f"{len(references)} references."
        )


def class_accuracy(predictions: Sequence[int], references: Sequence[int]) -> float:
    """``mean(prediction_n == reference_n)`` over class indices."""
    _check_lengths(predictions, references)
    return task_accuracy_metric().compute(predictions=list(predictions), references=list(references))["accuracy"]


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of generations equal to their reference after normalising case, whitespace and final punctuation."""
    _check_lengths(predictions, references)
    result = task_accuracy_metric().compute(
        predictions=[str(p) for p in predictions], references=[str(r) for r in references]
    )
    return result["exact_match"]
