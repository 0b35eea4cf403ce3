"""task_accuracy: accuracy over class indices, or exact match over normalised strings (an ``evaluate`` metric)."""

import re
import string

import datasets
import evaluate


_DESCRIPTION = """
Accuracy of task predictions. Integer predictions and references are class indices: `accuracy` is the fraction of
equal pairs. String predictions and references are generations: `exact_match` is the fraction equal after
lower-casing, collapsing whitespace and stripping leading/trailing whitespace and final punctuation.
"""
_KWARGS_DESCRIPTION = """
Args:
    predictions: list of class indices (int) or generated strings.
    references: list of the same type and length.
Returns:
    {"accuracy": float} for class indices, {"exact_match": float} for strings.
"""
_FINAL_PUNCTUATION = string.punctuation + "。！？"


def normalise(text: str) -> str:
    """Lower case, one space between words, no surrounding whitespace or final punctuation."""
    return re.sub(r"\s+", " ", text).strip().lower().rstrip(_FINAL_PUNCTUATION).strip()


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class TaskAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
                datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
            ],
        )

    def _compute(self, predictions, references):
        if not predictions:
            raise ValueError("task_accuracy needs at least one prediction.")
        if isinstance(predictions[0], str):
            equal = [normalise(p) == normalise(r) for p, r in zip(predictions, references, strict=True)]
            return {"exact_match": sum(equal) / len(equal)}
        equal = [int(p) == int(r) for p, r in zip(predictions, references, strict=True)]
        return {"accuracy": sum(equal) / len(equal)}
