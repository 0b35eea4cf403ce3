"""The shipped `evaluate` metric: hand-counted accuracy and exact match, offline."""

import pytest

from delta_trl.evaluation.metrics import class_accuracy, exact_match, task_accuracy_metric


def test_class_accuracy_counts_equal_indices():
    assert class_accuracy([0, 2, 1, 1], [0, 1, 1, 2]) == 0.5
    assert class_accuracy([3], [3]) == 1.0


def test_exact_match_normalises_case_whitespace_and_final_punctuation():
    predictions = ["  Paris.", "the  Cat sat", "No!", "yes", "4 2"]
    references = ["paris", "The cat sat.", "no", "yes sir", "42"]
    assert exact_match(predictions, references) == 3 / 5


def test_the_metric_is_an_evaluate_module_loaded_from_the_package():
    metric = task_accuracy_metric()
    assert metric.name == "task_accuracy"
    assert metric.compute(predictions=[1, 0], references=[1, 1]) == {"accuracy": 0.5}
    with pytest.raises(ValueError, match="got 0 predictions and 0 references"):
        class_accuracy([], [])
    with pytest.raises(ValueError, match="got 2 predictions and 1 references"):
        exact_match(["a", "b"], ["a"])
