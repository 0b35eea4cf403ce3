"""DeltaDPOTrainer: parity with DPOTrainer, the teacher's linear DPO, distillation, resume, bad input."""

import copy
import json

import pytest
import torch
from conftest import make_llama
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from torch.testing import assert_close
from trl import DPOConfig, DPOTrainer

from delta_trl import DeltaDPOConfig, DeltaDPOTrainer
from delta_trl.core.adapters import scaled_adapters, unparked
from delta_trl.core.linearize import linearized_forward
from delta_trl.core.losses import completion_logps, dpo_loss


LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0}
COMMON = {
    "use_cpu": True, "bf16": False, "gradient_checkpointing": False, "max_length": 64, "report_to": "none",
    "per_device_train_batch_size": 4, "max_steps": 2, "learning_rate": 1e-2, "logging_steps": 1,
    "disable_tqdm": True, "save_strategy": "no", "seed": 0,
}  # fmt: skip


def preference_rows(n=16):
    return [
        {
            "prompt": f"What is {i % 5} + {i % 3}?",
            "chosen": f" {i % 5 + i % 3}",
            "rejected": f" {i % 5 + i % 3 + 1} or so",
        }
        for i in range(n)
    ]


def conversational_rows(n=8):
    return [
        {
            "prompt": [{"role": "user", "content": f"What is {i % 5} + {i % 3}?"}],
            "chosen": [{"role": "assistant", "content": f"{i % 5 + i % 3}"}],
            "rejected": [{"role": "assistant", "content": "I do not know."}],
        }
        for i in range(n)
    ]


def _trainer(tokenizer, tmp_path, rows=None, seed=0, model=None, peft=True, **config):
    torch.manual_seed(seed)
    model = model if model is not None else make_llama(seed=seed, initializer_range=0.2)
    return DeltaDPOTrainer(
        model=model,
        args=DeltaDPOConfig(output_dir=str(tmp_path / "out"), **{**COMMON, **config}),
        train_dataset=Dataset.from_list(rows or preference_rows()),
        processing_class=tokenizer,
        peft_config=LoraConfig(**LORA) if peft else None,
    )


def _batch(trainer):
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def _randomize(model, seed=5):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.1)


def _reference_trainer(delta, tokenizer, tmp_path):
    """A stock DPOTrainer (base model + peft_config: the reference is θ0) with the same adapter weights."""
    reference = DPOTrainer(
        model=make_llama(initializer_range=0.2),
        args=DPOConfig(output_dir=str(tmp_path / "ref"), **COMMON),
        train_dataset=delta.train_dataset,
        processing_class=tokenizer,
        peft_config=LoraConfig(**LORA),
    )
    state = {k: v for k, v in delta.model.state_dict().items() if "delta_teacher" not in k}
    reference.model.load_state_dict(state)
    return reference


def _loss_and_metrics(trainer, batch):
    trainer.model.train()
    for store in trainer._metrics.values():
        store.clear()
    loss = trainer.compute_loss(trainer.model, batch)
    return loss, {k: v[0] for k, v in trainer._metrics["train"].items()}


def test_nonlinear_mode_equals_dpo_trainer(tiny_tokenizer, tmp_path):
    delta = _trainer(tiny_tokenizer, tmp_path, delta_mode="nonlinear")
    _randomize(delta.model)
    reference = _reference_trainer(delta, tiny_tokenizer, tmp_path)
    batch = _batch(delta)
    ours, our_metrics = _loss_and_metrics(delta, batch)
    theirs, their_metrics = _loss_and_metrics(reference, batch)
    assert_close(ours, theirs, rtol=0, atol=0)
    assert our_metrics == their_metrics


def test_delta_student_term_is_trl_sigmoid_dpo(tiny_tokenizer, tmp_path):
    """With γ = β_T = 0 and α = 1 the DELTA loss is the student's DPO loss: TRL's, computed with no reference pass."""
    delta = _trainer(
        tiny_tokenizer, tmp_path, alpha_sampling="fixed", distill_weight=0.0, teacher_loss_weight=0.0, beta=0.3
    )
    _randomize(delta.model)
    reference = _reference_trainer(delta, tiny_tokenizer, tmp_path)
    reference.beta = 0.3
    batch = _batch(delta)
    ours, our_metrics = _loss_and_metrics(delta, batch)
    theirs, their_metrics = _loss_and_metrics(reference, batch)
    assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen"):
        assert our_metrics[key] == pytest.approx(their_metrics[key], rel=1e-4, abs=1e-6), key
    assert {"delta/teacher_loss", "delta/distill_loss", "delta/alpha"} <= our_metrics.keys()


@pytest.mark.parametrize("normalization", ["relative", "sum"])
def test_delta_loss_is_the_sum_of_the_pure_terms(normalization, tiny_tokenizer, tmp_path):
    delta = _trainer(tiny_tokenizer, tmp_path, alpha_sampling="uniform", alpha_min=1.2, alpha_max=1.6,
                     distill_weight=0.3, teacher_loss_weight=0.7, beta=0.2,
                     distill_normalization=normalization)  # fmt: skip
    model = delta.model
    _randomize(model)
    batch = _batch(delta)
    alpha = delta._current_alpha()
    loss, metrics = _loss_and_metrics(delta, batch)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    kwargs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    model.eval()
    with torch.no_grad(), scaled_adapters(model, {"default": 0.0}):
        ref = completion_logps(model(**kwargs).logits, labels).chunk(2)
    with scaled_adapters(model, {"default": alpha}):
        student = model(**kwargs, output_hidden_states=True)
    with unparked(model, "delta_teacher"):
        teacher = linearized_forward(model, kwargs, "delta_teacher")
    mask = labels[:, 1:] != -100
    teacher_hidden = teacher.hidden(alpha)[0][:, :-1]
    distill = (student.hidden_states[-1][:, :-1] - teacher_hidden).pow(2).sum(-1)
    if normalization == "relative":  # ‖h_S − h_T‖² / ‖h_T‖²
        distill = distill / teacher_hidden.pow(2).sum(-1)
    distill = distill[mask].mean()
    teacher_dpo = dpo_loss(*completion_logps(teacher.logits(alpha), labels).chunk(2), *ref, beta=0.2)
    expected = (
        dpo_loss(*completion_logps(student.logits, labels).chunk(2), *ref, beta=0.2).losses.mean()
        + 0.3 * distill
        + 0.7 * teacher_dpo.losses.mean()
    )
    assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    # the teacher's reward metrics (log-probs kept from its loss, not recomputed)
    margins = teacher_dpo.chosen_rewards - teacher_dpo.rejected_rewards
    assert metrics["delta/teacher_rewards/margins"] == pytest.approx(margins.mean().item(), rel=1e-4, abs=1e-6)
    assert metrics["delta/teacher_rewards/chosen"] == pytest.approx(
        teacher_dpo.chosen_rewards.mean().item(), rel=1e-4, abs=1e-6
    )


def test_teacher_logps_match_finite_differences_of_the_model(tiny_tokenizer, tmp_path):
    delta = _trainer(tiny_tokenizer, tmp_path)
    model = delta.model.double()
    _randomize(model)
    batch = _batch(delta)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    kwargs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    alpha, h = 1.7, 1e-4
    with unparked(model, "delta_teacher"):
        linearized = linearized_forward(model, kwargs, "delta_teacher")
        model.eval()
        with torch.no_grad():
            logits = {}
            for sign in (1, 0, -1):
                with scaled_adapters(model, {"default": 0.0, "delta_teacher": sign * h}):
                    logits[sign] = model(**kwargs).logits
    finite_difference = logits[0] + alpha * (logits[1] - logits[-1]) / (2 * h)
    assert_close(
        completion_logps(linearized.logits(alpha), labels),
        completion_logps(finite_difference, labels),
        rtol=1e-3,
        atol=1e-3,
    )  # fmt: skip (RoPE runs in fp32 even in a double model)
    assert (linearized.tangent_logits.abs().max()) > 1e-2


def test_short_run_lowers_both_dpo_losses_and_distillation_pulls_the_student(tiny_tokenizer, tmp_path):
    runs = {}
    for gamma in (0.0, 10.0):  # a strong pull (relative L_KD), so that its effect shows within 12 steps
        trainer = _trainer(tiny_tokenizer, tmp_path / str(gamma), max_steps=12, alpha_sampling="uniform",
                           alpha_min=0.9, alpha_max=1.1, distill_weight=gamma, learning_rate=2e-2)  # fmt: skip
        trainer.train()
        runs[gamma] = [h for h in trainer.state.log_history if "delta/task_loss" in h]
    logs = runs[10.0]
    for key in ("delta/task_loss", "delta/teacher_loss"):
        assert logs[-1][key] < logs[0][key] - 0.05, key
    assert logs[-1]["rewards/accuracies"] == 1.0
    late = slice(-4, None)
    with_kd = sum(h["delta/distill_loss"] for h in runs[10.0][late])
    without_kd = sum(h["delta/distill_loss"] for h in runs[0.0][late])
    assert with_kd < 0.8 * without_kd


@pytest.mark.parametrize("setting", ["precompute", "gradient_checkpointing", "conversational"])
def test_trl_settings_work(setting, tiny_tokenizer, tmp_path):
    config, rows = {}, None
    if setting == "precompute":
        config["precompute_ref_log_probs"] = True
    elif setting == "gradient_checkpointing":
        config["gradient_checkpointing"] = True
    else:
        rows = conversational_rows()
        tiny_tokenizer = copy.deepcopy(tiny_tokenizer)
        tiny_tokenizer.chat_template = (
            "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}"
        )
    trainer = _trainer(tiny_tokenizer, tmp_path, rows=rows, **config)
    baseline = _trainer(tiny_tokenizer, tmp_path / "b", rows=rows)
    batch = _batch(trainer)
    loss, metrics = _loss_and_metrics(trainer, batch)
    expected, _ = _loss_and_metrics(baseline, {k: v for k, v in batch.items() if "ref_" not in k})
    assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    trainer.train()
    assert any("delta/distill_loss" in h for h in trainer.state.log_history)


def test_resume_is_exact_and_the_saved_model_is_the_student(tiny_tokenizer, tmp_path):
    common = {"max_steps": 4, "save_strategy": "steps", "save_steps": 2, "alpha_sampling": "uniform"}
    full = _trainer(tiny_tokenizer, tmp_path / "a", **common)
    full.train()
    expected = {k: p.detach().clone() for k, p in full.model.named_parameters() if "lora_" in k}
    resumed = _trainer(tiny_tokenizer, tmp_path / "b", **common)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "out" / "checkpoint-2"))
    for key, value in resumed.model.named_parameters():
        if "lora_" in key:
            assert_close(value, expected[key], rtol=1e-5, atol=1e-7)
    full.save_model(str(tmp_path / "final"))
    assert not any("teacher" in k for k in load_file(tmp_path / "final" / "adapter_model.safetensors"))
    assert json.loads((tmp_path / "final" / "delta_trl.json").read_text())["delta_mode"] == "delta"


def test_bad_inputs_fail_when_the_trainer_is_built(tiny_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="preference data needs `chosen` and `rejected`"):
        _trainer(tiny_tokenizer, tmp_path, rows=[{"prompt": "a", "answer": "b"}] * 4)
    with pytest.raises(ValueError, match="DoRA"):
        DeltaDPOTrainer(model=make_llama(), args=DeltaDPOConfig(output_dir=str(tmp_path), **COMMON),
                        train_dataset=Dataset.from_list(preference_rows()), processing_class=tiny_tokenizer,
                        peft_config=LoraConfig(**LORA, use_dora=True))  # fmt: skip
    with pytest.raises(ValueError, match="loss_type=\\['hinge'\\] is not supported"):
        DeltaDPOConfig(output_dir=str(tmp_path), loss_type=["hinge"], **COMMON)
    trained = get_peft_model(make_llama(), LoraConfig(**LORA))
    _randomize(trained)
    with pytest.raises(ValueError, match="precompute_ref_log_probs=True"):
        _trainer(tiny_tokenizer, tmp_path, model=trained, peft=False)
    fresh = get_peft_model(make_llama(), LoraConfig(**LORA))  # B = 0: its "ref" copy is the base model
    assert _trainer(tiny_tokenizer, tmp_path, model=fresh, peft=False)._reference == "base"


def test_positional_arguments_like_dpo_trainer(tiny_tokenizer, tmp_path):
    """DPOTrainer(model, ref_model, args, data_collator, train_dataset, eval_dataset, processing_class, ...)."""
    data = Dataset.from_list(preference_rows(8))
    args = DeltaDPOConfig(output_dir=str(tmp_path / "out"), **COMMON)
    trainer = DeltaDPOTrainer(
        make_llama(), None, args, None, data, None, tiny_tokenizer, peft_config=LoraConfig(**LORA)
    )
    assert "delta_teacher" in trainer.model.peft_config
    with pytest.raises(ValueError, match="preference data needs"):
        DeltaDPOTrainer(make_llama(), None, args, None, Dataset.from_list([{"text": "x"}] * 2), None, tiny_tokenizer,
                        peft_config=LoraConfig(**LORA))  # fmt: skip
