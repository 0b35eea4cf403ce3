"""α selection: grid search on constructed cases, and scoring of merged models against explicit references."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_llama, make_t5
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForSequenceClassification

from delta_trl.core.linearize import linearized_forward
from delta_trl.evaluation.scoring import (
    ClassificationSet,
    class_scores,
    load_classification_file,
    load_task_adapters,
    merged_logits,
)
from delta_trl.evaluation.selection import addition_sweep, negation_sweep, select_alpha, select_negation_alpha
from delta_trl.merging.merge import merge_adapters


def test_select_alpha_picks_known_best():
    """acc_x = 1 − (α − 0.4)², acc_y = 0.5 − 0.5(α − 0.4)², references 1 and 0.5: both normalized curves are
    1 − (α − 0.4)², so the best α on the grid is 0.4 (value 1) and α = 1 gives 1 − 0.36 = 0.64."""

    def evaluate(a):
        return {"x": 1 - (a - 0.4) ** 2, "y": 0.5 - 0.5 * (a - 0.4) ** 2}

    result = select_alpha(evaluate, [0.2, 0.4, 0.6, 0.8], {"x": 1.0, "y": 0.5})
    assert result.best_alpha == 0.4
    assert result.best_normalized == pytest.approx(1.0)
    assert result.alpha_one_normalized == pytest.approx(0.64)
    assert result.normalized[0] == pytest.approx(1 - 0.04)
    assert set(result.to_dict()) >= {"alphas", "per_task", "normalized", "best_alpha", "alpha_one_normalized"}


def test_select_alpha_errors():
    with pytest.raises(ValueError, match="empty"):
        select_alpha(lambda a: {"x": 1.0}, [], {"x": 1.0})
    with pytest.raises(ValueError, match="> 0"):
        select_alpha(lambda a: {"x": 1.0}, [1.0], {"x": 0.0})
    with pytest.raises(ValueError, match="no score"):
        select_alpha(lambda a: {"x": 1.0}, [1.0], {"x": 1.0, "y": 1.0})


def test_select_negation_alpha_respects_control_floor():
    """target = 0.9 − 0.2α, control = 0.8 − 0.1α, base control 0.8 → floor 0.76 → α ≤ 0.4 feasible; best α = 0.4."""
    result = select_negation_alpha(lambda a: (0.9 - 0.2 * a, 0.8 - 0.1 * a), [0.2, 0.4, 0.6, 1.0], 0.8)
    assert result.alphas[0] == 0.0
    assert result.best_alpha == 0.4
    assert result.best_target == pytest.approx(0.82)
    assert result.best_control == pytest.approx(0.76)


def test_classification_set_needs_labels(tmp_path):
    with pytest.raises(ValueError, match="one label per text"):
        ClassificationSet(["a", "b"], [0])
    with pytest.raises(ValueError, match="not indices"):
        ClassificationSet(["a"], [2], [" yes", " no"])
    path = tmp_path / "val.jsonl"
    path.write_text(json.dumps({"text": "a"}) + "\n")
    with pytest.raises(ValueError, match="without the column"):
        load_classification_file(path, label_words=[" yes", " no"])
    csv_path = tmp_path / "val.csv"
    csv_path.write_text("text,label\nthe cat sleeps, no\nthe cat runs,0\n")
    data = load_classification_file(csv_path, label_words=[" yes", " no"])
    assert data.labels == [1, 0]


def _adapters(tmp_path, make_model, targets, linear_flags=(False, False)):
    paths = {}
    for i, (name, linear) in enumerate(zip(["x", "y"], linear_flags, strict=True)):
        torch.manual_seed(10 + i)
        config = LoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights=False)
        peft_model = get_peft_model(make_model(), config)
        peft_model.save_pretrained(tmp_path / name)
        if linear:
            (tmp_path / name / "delta_trl.json").write_text(
                json.dumps({"delta_mode": "linear", "evaluate_linearized": True})
            )
        paths[name] = tmp_path / name
    return paths


def _explicit_word_loglik(model, tokenizer, text, word, seq2seq):
    """log p(word | text) by a plain forward of an ordinary (merged) model."""
    t = tokenizer(text)["input_ids"]
    w = tokenizer(word, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        if seq2seq:
            labels = torch.tensor([w])
            logits = model(input_ids=torch.tensor([t]), labels=labels).logits[0]
            return sum(logits.log_softmax(-1)[k, tok].item() for k, tok in enumerate(w))
        logits = model(input_ids=torch.tensor([t + w])).logits[0]
        return sum(logits.log_softmax(-1)[len(t) - 1 + k, tok].item() for k, tok in enumerate(w))


@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_generative_scores_match_folded_merge(tmp_path, tiny_tokenizer, arch):
    make_model, targets = (make_llama, ["q_proj", "v_proj"]) if arch == "llama" else (make_t5, ["q", "v"])
    paths = _adapters(tmp_path, make_model, targets)
    model, linearized = load_task_adapters(make_model(), paths)
    assert linearized is False
    data = ClassificationSet(["the cat sleeps", "a man plays a guitar"], [0, 1], [" yes", " no"])
    scores = class_scores(model, tiny_tokenizer, data, {"x": 0.6, "y": -0.4}, batch_size=1)

    folded = merge_adapters(
        list(paths.values()), [0.6, -0.4], tmp_path / "folded", fold_into_base=True, base_model=make_model()
    )
    reference = type(make_model()).from_pretrained(folded.output_dir).eval()
    for n, text in enumerate(data.texts):
        for c, word in enumerate(data.label_words):
            expected = _explicit_word_loglik(reference, tiny_tokenizer, text, word, arch == "t5")
            assert scores[n, c].item() == pytest.approx(expected, abs=1e-4)


def test_sequence_classification_scores_are_logits(tmp_path, tiny_tokenizer):
    def make_cls():
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, num_labels=3, pad_token_id=0,
        )  # fmt: skip
        return LlamaForSequenceClassification(config)

    paths = _adapters(tmp_path, make_cls, ["q_proj"])
    model, _ = load_task_adapters(make_cls(), paths)
    data = ClassificationSet(["the cat sleeps", "yes"], [0, 2])
    scores = class_scores(model, tiny_tokenizer, data, {"x": 1.0})
    enc = tiny_tokenizer(data.texts, return_tensors="pt", padding=True)
    torch.testing.assert_close(scores, merged_logits(model, dict(enc), {"x": 1.0}).float())
    assert scores.shape == (2, 3)


def test_linearized_adapters_are_scored_linearized(tmp_path, tiny_tokenizer):
    paths = _adapters(tmp_path, make_llama, ["q_proj", "v_proj"], linear_flags=(True, True))
    model, linearized = load_task_adapters(make_llama(), paths)
    assert linearized is True
    ids = torch.tensor([tiny_tokenizer("the cat sleeps")["input_ids"]])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    got = merged_logits(model, inputs, {"x": 0.7, "y": 0.3}, linearized=True)
    lin_x = linearized_forward(model, inputs, "x")
    lin_y = linearized_forward(model, inputs, "y")
    expected = lin_x.base_logits + 0.7 * lin_x.tangent_logits + 0.3 * lin_y.tangent_logits
    torch.testing.assert_close(got, expected.detach())
    nonlinear = merged_logits(model, inputs, {"x": 0.7, "y": 0.3})
    assert not torch.allclose(got, nonlinear)


def test_mixed_linearized_and_plain_adapters_raise(tmp_path):
    paths = _adapters(tmp_path, make_llama, ["q_proj"], linear_flags=(True, False))
    with pytest.raises(ValueError, match="linearized"):
        load_task_adapters(make_llama(), paths)


def test_sweeps_run_on_tiny_model(tmp_path, tiny_tokenizer):
    paths = _adapters(tmp_path, make_llama, ["q_proj", "v_proj"])
    model, _ = load_task_adapters(make_llama(), paths)
    x = ClassificationSet(["the cat sleeps", "the cat runs"], [0, 1], [" yes", " no"])
    y = ClassificationSet(["a man plays", "a person makes music"], [1, 0], [" yes", " no"])
    result = addition_sweep(model, tiny_tokenizer, {"x": x, "y": y}, [0.0, 0.5], reference={"x": 1.0, "y": 1.0})
    assert result.alphas == [0.0, 0.5]
    assert set(result.per_task[0]) == {"x", "y"}
    negation = negation_sweep(model, tiny_tokenizer, "x", x, y, [0.5, 1.0])
    assert negation.alphas == [0.0, 0.5, 1.0]
    assert negation.best_alpha in negation.alphas
    with pytest.raises(ValueError, match="empty"):
        addition_sweep(model, tiny_tokenizer, {"x": x}, [])
