"""The experiment's task scores against independent computations: HF greedy `generate`, explicit log-probability
sums, hand-worked implicit-reward accuracies."""

import pytest
import torch
from conftest import make_llama, make_t5
from peft import LoraConfig, get_peft_model

from delta_trl.core.adapters import scaled_adapters
from delta_trl.core.linearize import linearized_forward
from delta_trl.evaluation.scoring import (
    ClassificationSet,
    class_scores,
    class_scores_many,
    merged_logits,
)
from delta_trl.evaluation.task_scores import (
    TaskEvalSet,
    greedy_answers,
    greedy_token_ids,
    implicit_reward_accuracy,
    score_task,
    sequence_logps,
)


def _peft(model, targets):
    torch.manual_seed(1)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights=False)
    return get_peft_model(model, config).eval()


def test_implicit_reward_accuracy_counts_ties_as_half():
    assert implicit_reward_accuracy(torch.tensor([1.0, -2.0, 0.0, 3.0])) == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    assert implicit_reward_accuracy(torch.zeros(5)) == 0.5


@pytest.mark.parametrize("seq2seq", [False, True])
def test_greedy_answers_equal_generate(tiny_tokenizer, seq2seq):
    model = _peft(make_t5(), ["q", "v"]) if seq2seq else _peft(make_llama(initializer_range=0.2), ["q_proj", "v_proj"])
    prompts = ["What is 2 + 3?", "The capital of France is"]
    answers = greedy_answers(model, tiny_tokenizer, prompts, {"default": 1.0}, max_new_tokens=5)
    for prompt, answer in zip(prompts, answers, strict=True):
        ids = torch.tensor([tiny_tokenizer(prompt)["input_ids"]])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                                 eos_token_id=tiny_tokenizer.eos_token_id, pad_token_id=0)  # fmt: skip
        new = out[0] if seq2seq else out[0, ids.shape[1] :]
        expected = [int(t) for t in new if int(t) not in (tiny_tokenizer.eos_token_id,)]
        if seq2seq:
            expected = expected[1:] if out[0, 0] == model.config.decoder_start_token_id else expected
        assert answer == tiny_tokenizer.decode(expected, skip_special_tokens=True)


@pytest.mark.parametrize("linearized", [False, True])
@pytest.mark.parametrize("seq2seq", [False, True])
def test_batched_greedy_decoding_equals_one_prompt_at_a_time(tiny_tokenizer, seq2seq, linearized):
    """Right-padded batches of prompts of different lengths (rows leaving at EOS or the token limit) decode exactly
    what one prompt at a time decodes, on the model and on its linearization, for a two-adapter merge."""
    model = _peft(make_t5(), ["q", "v"]) if seq2seq else _peft(make_llama(initializer_range=0.2), ["q_proj", "v_proj"])
    torch.manual_seed(2)
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=4, target_modules=["q", "v"] if seq2seq else ["q_proj", "v_proj"],
                                          init_lora_weights=False))  # fmt: skip
    prompts = ["What is 2 + 3?", "Hi", "The capital of France is", "a b c d e f g h i j", "Why?", "One more, please"]
    factors = {"default": 0.8, "other": 0.8}
    one_by_one = greedy_token_ids(model, tiny_tokenizer, prompts, factors, linearized=linearized, max_new_tokens=6,
                                  batch_size=1)  # fmt: skip
    batched = greedy_token_ids(model, tiny_tokenizer, prompts, factors, linearized=linearized, max_new_tokens=6,
                               batch_size=4)  # fmt: skip
    assert batched == one_by_one
    assert {len(ids) for ids in one_by_one} != {0}


def test_sequence_logps_and_preference_score_against_explicit_sums(tiny_tokenizer):
    model = _peft(make_llama(initializer_range=0.2), ["q_proj", "v_proj"])
    prompts, chosen, rejected = ["What is 2 + 3?", "What is 7 + 1?"], [" 5.", " 8."], [" 6!", " 9 please"]

    def explicit(prompt, completion, scale):
        x = tiny_tokenizer(prompt)["input_ids"]
        y = tiny_tokenizer(completion, add_special_tokens=False)["input_ids"]
        for layer in model.modules():
            if hasattr(layer, "scaling") and isinstance(layer.scaling, dict):
                layer.scaling["default"] = scale * 2.0  # lora_alpha / r
        with torch.no_grad():
            logp = model(input_ids=torch.tensor([x + y])).logits[0].double().log_softmax(-1)
        for layer in model.modules():
            if hasattr(layer, "scaling") and isinstance(layer.scaling, dict):
                layer.scaling["default"] = 2.0
        return sum(float(logp[len(x) - 1 + k, t]) for k, t in enumerate(y))

    got = sequence_logps(model, tiny_tokenizer, prompts, chosen, {"default": 0.7}, batch_size=2)
    want = torch.tensor([explicit(p, c, 0.7) for p, c in zip(prompts, chosen, strict=True)], dtype=torch.float64)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)

    data = TaskEvalSet("preference", prompts, chosen=chosen, rejected=rejected)
    score = score_task(model, tiny_tokenizer, data, {"default": 0.7}, beta=0.5)
    margins = torch.tensor([
        0.5 * ((explicit(p, c, 0.7) - explicit(p, c, 0.0)) - (explicit(p, r, 0.7) - explicit(p, r, 0.0)))
        for p, c, r in zip(prompts, chosen, rejected, strict=True)
    ])  # fmt: skip
    assert score["mean_margin"] == pytest.approx(float(margins.mean()), abs=1e-4)
    assert score["score"] == implicit_reward_accuracy(margins)
    assert score_task(model, tiny_tokenizer, data, {"default": 0.0}) == {"score": 0.5, "mean_margin": 0.0}


def test_closed_and_open_scores(tiny_tokenizer):
    model = _peft(make_llama(initializer_range=0.2), ["q_proj", "v_proj"])
    prompts = ["What is 2 + 3?", "The capital of France is", "What is 7 + 1?"]
    answers = greedy_answers(model, tiny_tokenizer, prompts, {"default": 1.0}, max_new_tokens=3)
    references = [answers[0].upper() + ".", answers[1] + " extra", "  " + answers[2] + "  "]
    open_set = TaskEvalSet("open", prompts, references)
    result = score_task(model, tiny_tokenizer, open_set, {"default": 1.0}, max_new_tokens=3)
    assert result["score"] == pytest.approx(2 / 3)  # case, spaces and final punctuation are normalised away
    candidates = [" 5", " 8", " Paris"]
    scores = class_scores(model, tiny_tokenizer, ClassificationSet(prompts, [0, 0, 0], candidates), {"default": 1.0})
    predicted = [candidates[i] for i in scores.argmax(-1).tolist()]
    wrong = [candidates[(candidates.index(p) + 1) % 3] for p in predicted]
    mixed = predicted[:2] + wrong[2:]
    for answers, expected in ((predicted, 1.0), (wrong, 0.0), (mixed, 2 / 3)):
        closed = TaskEvalSet("closed", prompts, answers, candidates=candidates)
        assert score_task(model, tiny_tokenizer, closed, {"default": 1.0})["score"] == pytest.approx(expected)
    with pytest.raises(ValueError, match="not among the candidates"):
        TaskEvalSet("closed", prompts[:1], [" 7"], candidates=[" 5"])


@pytest.mark.parametrize("linearized", [False, True])
def test_many_points_in_one_pass_equal_one_point_at_a_time(tiny_tokenizer, linearized):
    """The shared-JVP path (linearized: f(θ0) + Σ α_t J τ_t for every point from one JVP per adapter) and the
    label-position-only log-softmax give the scores of separate full evaluations."""
    model = make_llama(initializer_range=0.2)
    torch.manual_seed(2)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(model, config, adapter_name="a")
    model.add_adapter("b", config)
    for name, param in model.named_parameters():  # a distinct second adapter
        if ".b." in name:
            param.data.normal_(0, 0.3)
    model.base_model.set_adapter(["a", "b"])
    model.eval()
    data = ClassificationSet(["What is 2 + 3?", "The capital of France is", "What is 7 + 1? 8."], [0, 2, 1],
                             [" 5", " 8", " Paris"])  # fmt: skip
    points = [{}, {"a": 1.0}, {"a": 0.5, "b": 0.5}, {"a": 1.3, "b": -0.4}]
    together = class_scores_many(model, tiny_tokenizer, data, points, linearized=linearized, batch_size=2)
    for factors, scores in zip(points, together, strict=True):
        alone = class_scores(model, tiny_tokenizer, data, factors, linearized=linearized, batch_size=3)
        torch.testing.assert_close(scores, alone, atol=1e-5, rtol=1e-5)
        if linearized and factors:  # the definition, one JVP per adapter summed: the grouped JVP must agree
            inputs = tiny_tokenizer(data.texts[0] + data.label_words[0], return_tensors="pt")
            outs = {n: linearized_forward(model, dict(inputs), n, differentiable=False) for n in factors}
            expected = next(iter(outs.values())).base_logits + sum(
                a * outs[n].tangent_logits for n, a in factors.items()
            )
            got = merged_logits(model, dict(inputs), factors, linearized=True)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seq2seq", [False, True])
def test_one_token_label_words_are_scored_from_one_sequence_per_text(tiny_tokenizer, seq2seq):
    """The single-token shortcut (one forward per text, all words read off its next-token distribution) equals the
    log-probability of each (text + word) sequence computed explicitly."""
    model = _peft(make_t5(), ["q", "v"]) if seq2seq else _peft(make_llama(initializer_range=0.2), ["q_proj", "v_proj"])
    words = ["5", "8", "3"]
    assert all(len(tiny_tokenizer(w, add_special_tokens=False)["input_ids"]) == 1 for w in words)
    texts = ["What is 2 + 3?", "What is 7 + 1? please", "The cat sleeps."]
    scores = class_scores(model, tiny_tokenizer, ClassificationSet(texts, [0, 1, 2], words), {"default": 0.8})
    base = model.get_base_model()
    for n, text in enumerate(texts):
        x = tiny_tokenizer(text)["input_ids"]
        for c, word in enumerate(words):
            w = tiny_tokenizer(word, add_special_tokens=False)["input_ids"][0]
            with torch.no_grad(), scaled_adapters(model, {"default": 0.8}):
                if seq2seq:
                    start = base.prepare_decoder_input_ids_from_labels(labels=torch.tensor([[w]]))
                    logits = model(input_ids=torch.tensor([x]), decoder_input_ids=start).logits[0, 0]
                else:
                    logits = model(input_ids=torch.tensor([x + [w]])).logits[0, len(x) - 1]
            assert scores[n, c].item() == pytest.approx(logits.log_softmax(-1)[w].item(), abs=1e-5)
