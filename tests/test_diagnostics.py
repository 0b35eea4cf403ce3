"""Diagnostics: ξ on constructed predictions, linearization error by hand, JSON + PNG outputs."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_llama
from peft import LoraConfig, get_peft_model

from delta_trl.core.adapters import scaled_adapters
from delta_trl.evaluation.diagnostics import (
    PreferenceSet,
    alpha_sweep_report,
    classification_predictor,
    completion_logp,
    disentanglement_error,
    disentanglement_points,
    dpo_front,
    linearization_error,
)
from delta_trl.evaluation.scoring import ClassificationSet, load_task_adapters
from delta_trl.evaluation.selection import select_alpha


def test_xi_is_zero_for_identical_predictions(tmp_path):
    def predict(factors, task):
        return torch.tensor([0, 1, 1, 0])

    result = disentanglement_error(predict, ("a", "b"), [-1.0, 0.0, 1.0], output_dir=tmp_path)
    assert result["xi"] == [[0.0] * 3] * 3
    assert json.loads((tmp_path / "disentanglement_error.json").read_text())["tasks"] == ["a", "b"]
    assert (tmp_path / "disentanglement_error.png").stat().st_size > 0


def test_xi_counts_disagreements_by_hand():
    """Task a's predictions flip sign with α_b > 0 on half of its 4 inputs; task b is unaffected:
    ξ = 0.5 where α_b > 0, else 0."""

    def predict(factors, task):
        base = torch.tensor([0, 1, 1, 0])
        if task == "a" and factors.get("b", 0.0) > 0:
            return torch.tensor([1, 0, 1, 0])
        return base

    result = disentanglement_error(predict, ("a", "b"), [0.0, 1.0], [-1.0, 0.0, 2.0])
    assert result["xi"] == [[0.0, 0.0, 0.5], [0.0, 0.0, 0.5]]


@pytest.fixture
def llama_with_adapters(tmp_path):
    paths = {}
    for i, name in enumerate(["help", "verb"]):
        torch.manual_seed(20 + i)
        config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        get_peft_model(make_llama(), config).save_pretrained(tmp_path / name)
        paths[name] = tmp_path / name
    model, _ = load_task_adapters(make_llama(), paths)
    return model


def test_xi_on_tiny_model_writes_files(llama_with_adapters, tiny_tokenizer, tmp_path):
    data = {
        "help": ClassificationSet(["the cat sleeps", "the cat runs"], [0, 1], [" yes", " no"]),
        "verb": ClassificationSet(["a man plays", "music"], [1, 0], [" yes", " no"]),
    }
    predict = classification_predictor(llama_with_adapters, tiny_tokenizer, data)
    result = disentanglement_error(predict, ("help", "verb"), [0.0, 1.0], output_dir=tmp_path)
    assert result["xi"][0][0] == 0.0  # α1 = α2 = 0 is θ0 on both sides
    alone_help, alone_verb = predict({"help": 1.0}, "help"), predict({"verb": 1.0}, "verb")
    both = {"help": 1.0, "verb": 1.0}
    expected = float(
        (predict(both, "help") != alone_help).double().mean() + (predict(both, "verb") != alone_verb).double().mean()
    )
    assert result["xi"][1][1] == expected


@pytest.mark.parametrize("linearized", [False, True])
def test_precomputed_points_give_the_same_xi(llama_with_adapters, tiny_tokenizer, linearized):
    """Scoring every grid point in one pass per task (shared JVPs when linearized) changes no prediction."""
    data = {
        "help": ClassificationSet(["the cat sleeps", "the cat runs", "What is 2 + 3?"], [0, 1, 0], [" yes", " no"]),
        "verb": ClassificationSet(["a man plays", "music", "premise: a"], [1, 0, 1], [" yes", " no"]),
    }
    grid = [-1.0, 0.0, 0.5, 2.0]
    points = disentanglement_points(("help", "verb"), grid)
    assert len(points) == 2 * len(grid) + len(grid) ** 2
    lazy = classification_predictor(llama_with_adapters, tiny_tokenizer, data, linearized=linearized)
    eager = classification_predictor(llama_with_adapters, tiny_tokenizer, data, linearized=linearized, points=points)
    for factors in points:
        for task in data:
            assert torch.equal(eager(factors, task), lazy(factors, task)), (factors, task)
    assert (
        disentanglement_error(eager, ("help", "verb"), grid)["xi"]
        == disentanglement_error(lazy, ("help", "verb"), grid)["xi"]
    )


def test_linearization_error_by_hand(llama_with_adapters, tiny_tokenizer, tmp_path):
    from delta_trl.core.linearize import linearized_forward
    from delta_trl.evaluation.scoring import merged_logits

    model = llama_with_adapters
    ids = torch.tensor([tiny_tokenizer("the cat sleeps on the mat")["input_ids"]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    result = linearization_error(model, [batch], "help", [0.0, 0.5, 2.0], output_dir=tmp_path)
    lin = linearized_forward(model, batch, "help")
    z = merged_logits(model, batch, {"help": 2.0})
    expected = ((z - lin.logits(2.0)) ** 2).sum() / ((z - lin.base_logits) ** 2).sum()
    assert result["relative_error"][0] is None  # α = 0: z = f(θ0), 0/0
    assert result["relative_error"][2] == pytest.approx(float(expected), rel=1e-4)
    assert 0 < result["relative_error"][1] < result["relative_error"][2]  # the error grows along the path
    saved = json.loads((tmp_path / "linearization_error.json").read_text())
    assert set(saved) == {"adapter", "alphas", "relative_error", "numerator", "denominator"}
    assert (tmp_path / "linearization_error.png").is_file()


def test_alpha_sweep_report_files(tmp_path):
    selection = select_alpha(
        lambda a: {"x": 1 - (a - 0.5) ** 2, "y": 0.8 - a / 10}, [0.0, 0.5, 1.0], {"x": 1, "y": 0.8}
    )
    alpha_sweep_report(selection, output_dir=tmp_path)
    saved = json.loads((tmp_path / "alpha_sweep.json").read_text())
    assert saved["best_alpha"] == 0.5
    assert (tmp_path / "alpha_sweep.png").is_file()


def test_dpo_front_on_tiny_model(llama_with_adapters, tiny_tokenizer, tmp_path):
    model = llama_with_adapters
    pairs = PreferenceSet(["What is 2 + 3?"], [" 5."], [" 5. The capital of France is Paris."])

    def verbosity(prompts, responses):
        return sum(len(r) for r in responses) / len(responses)

    result = dpo_front(
        model,
        tiny_tokenizer,
        help_adapter="help",
        verb_adapter="verb",
        lambdas=[0.0, 1.0],
        prompts=["What is 2 + 3?"],
        helpfulness_score=lambda prompts, responses: float(sum("5" in r for r in responses)),
        verbosity_score=verbosity,
        preference_sets={"helpfulness": pairs, "verbosity": pairs},
        max_new_tokens=4,
        output_dir=tmp_path,
    )
    assert set(result) >= {"lambdas", "helpfulness", "verbosity", "mean_response_length", "preference_accuracy"}
    assert all(0 <= n <= 4 for n in result["mean_response_length"])
    assert all(v in (0.0, 1.0) for v in result["preference_accuracy"]["verbosity"])
    assert (tmp_path / "dpo_front.png").is_file()
    # Implicit reward is 0 at θ0 itself, so the margin is not > 0: the base model has preference accuracy 0.
    from delta_trl.evaluation.diagnostics import preference_accuracy

    assert preference_accuracy(model, tiny_tokenizer, pairs, {}) == 0.0
    assert completion_logp(model, tiny_tokenizer, "What", " is", {}) < 0


def test_completion_logp_is_the_sum_of_next_token_logprobs(llama_with_adapters, tiny_tokenizer):
    model = llama_with_adapters
    x = tiny_tokenizer("What is 2 + 3?")["input_ids"]
    y = tiny_tokenizer(" 5.", add_special_tokens=False)["input_ids"]
    with torch.no_grad(), scaled_adapters(model, {"help": 0.7, "verb": 0.0}):
        logprobs = model(input_ids=torch.tensor([x + y])).logits[0].log_softmax(-1)
    expected = sum(logprobs[len(x) - 1 + k, token].item() for k, token in enumerate(y))
    got = completion_logp(model, tiny_tokenizer, "What is 2 + 3?", " 5.", {"help": 0.7})
    assert got == pytest.approx(expected, rel=1e-6)
