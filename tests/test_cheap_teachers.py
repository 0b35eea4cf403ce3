"""The opt-in cheaper teachers (issue 13): the finite-difference tangent (`teacher_tangent='fd'`) against the exact
JVP, its refusals, and the teacher on one step in k (`teacher_every_k_steps`), on tiny Llama / T5 models."""

import pytest
import torch
from conftest import addition_rows, delta_config, make_llama, make_student_and_teacher
from datasets import Dataset
from peft import LoraConfig
from torch.testing import assert_close
from transformers import DataCollatorForSeq2Seq
from transformers.models.llama import modeling_llama

from delta_trl import DeltaTrainer
from delta_trl.core.adapters import lora_layers, nominal_scaling, scaled_adapters, unparked
from delta_trl.core.linearize import (
    finite_difference_step,
    finite_difference_teacher_forward,
    linearized_teacher_forward,
    linearized_teacher_loss,
    relative_adapter_size,
)
from delta_trl.core.losses import supervised_mask, token_cross_entropy
from delta_trl.core.rows import row_targets, rows_cross_entropy
from delta_trl.training.configs import deepspeed_zero_stage


# Measured with the automatic ε (tiny models, LoRA weights ~ N(0, 0.1), ρ ≈ 2 Llama / 0.46 T5): tangent relative
# error 1.2e-3 / 1.4e-3 in fp32, 5e-4 / 7e-4 in fp64 (HF norms compute in fp32); teacher gradient 3e-5 / 3.5e-4.
TANGENT_RTOL = 3e-3
GRADIENT_RTOL = 2e-3


def _peft(kind: str, dtype=torch.float32, std: float = 0.1):
    return make_student_and_teacher(kind, r=4, teacher_r=4, std=std, dtype=dtype)


def _inputs(kind: str):
    torch.manual_seed(2)
    ids = torch.randint(2, 300, (2, 8))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    if kind == "t5":
        labels = torch.randint(2, 300, (2, 5))
        labels[1, 4] = -100
    else:
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, :2] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _teacher_gradient(model, inputs, rows, targets, forward, **kwargs):
    params = [p for n, p in model.named_parameters() if ".teacher." in n]
    with unparked(model, "teacher"):
        teacher = forward(model, inputs, "teacher", rows, (-1,), **kwargs)
        loss = linearized_teacher_loss(model, "teacher", teacher, lambda z: rows_cross_entropy(z, targets, 7), 1.3)
    return teacher, loss, torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_fd_tangent_and_gradient_are_close_to_the_exact_jvp(kind, dtype):
    model, inputs = _peft(kind, dtype), _inputs(kind)
    rows, targets = row_targets(inputs["labels"], shift=kind == "llama")
    exact, exact_loss, exact_grad = _teacher_gradient(model, inputs, rows, targets, linearized_teacher_forward)
    fd, fd_loss, fd_grad = _teacher_gradient(model, inputs, rows, targets, finite_difference_teacher_forward)
    assert torch.equal(fd.base_logits, exact.base_logits)  # the primal (DPO reference) is exact
    assert _rel(fd.tangent_logits, exact.tangent_logits) < TANGENT_RTOL
    assert _rel(fd.tangent_hidden[0], exact.tangent_hidden[0]) < TANGENT_RTOL
    assert abs(fd_loss.item() - exact_loss.item()) < 1e-4 * abs(exact_loss.item())
    assert _rel(fd_grad, exact_grad) < GRADIENT_RTOL


def _fp64_rms_norm(self, hidden_states):
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def test_fd_converges_in_a_model_that_is_fp64_throughout(monkeypatch):
    """With every op in fp64 (HF's RMSNorm upcasts to fp32 only), a small explicit ε is ~1e3 times tighter."""
    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", _fp64_rms_norm)
    model, inputs = _peft("llama", torch.float64), _inputs("llama")
    rows, targets = row_targets(inputs["labels"], shift=True)
    exact, _, exact_grad = _teacher_gradient(model, inputs, rows, targets, linearized_teacher_forward)
    with unparked(model, "teacher"):
        eps = 1e-7 / relative_adapter_size(model, "teacher")
    fd, _, fd_grad = _teacher_gradient(model, inputs, rows, targets, finite_difference_teacher_forward, eps=eps)
    assert _rel(fd.tangent_logits, exact.tangent_logits) < 1e-5
    assert _rel(fd_grad, exact_grad) < 1e-7


def test_fd_tangent_of_a_zero_adapter_is_exactly_zero():
    model, inputs = _peft("llama"), _inputs("llama")
    with torch.no_grad():
        for layer in lora_layers(model, "teacher"):
            layer.lora_B["teacher"].weight.zero_()
    rows, _ = row_targets(inputs["labels"], shift=True)
    with unparked(model, "teacher"), torch.no_grad():
        assert relative_adapter_size(model, "teacher") == 0.0
        fd = finite_difference_teacher_forward(model, inputs, "teacher", rows, (-1,))
    assert fd.tangent_logits.abs().max() == 0
    assert fd.tangent_hidden[0].abs().max() == 0


def test_step_size_and_relative_size_formulas():
    model = _peft("llama")
    ratios = []
    for layer in lora_layers(model, "teacher"):
        update = nominal_scaling(layer, "teacher") * layer.lora_B["teacher"].weight @ layer.lora_A["teacher"].weight
        ratios.append((update.norm() / layer.get_base_layer().weight.norm()) ** 2)
    assert relative_adapter_size(model, "teacher") == pytest.approx(torch.stack(ratios).mean().sqrt().item(), rel=1e-5)
    fp32 = torch.finfo(torch.float32).eps ** 0.5
    assert finite_difference_step(2.0, torch.float32) == pytest.approx(fp32 / 2)
    assert finite_difference_step(2.0, torch.float64) == pytest.approx(fp32 / 2)  # never below fp32: HF norms
    assert finite_difference_step(0.0, torch.float32) == 1.0


# ---- refusals ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"teacher_tangent": "fd", "bf16": True}, "bf16"),
        ({"teacher_tangent": "fd", "fp16": True}, "fp16"),
        ({"teacher_tangent": "fd", "tf32": True}, "tf32"),
        ({"teacher_tangent": "fd", "deepspeed": {"zero_optimization": {"stage": 3}}}, "ZeRO-3"),
        ({"teacher_tangent": "fd", "fsdp": "full_shard"}, "FSDP"),
        ({"teacher_tangent": "fd", "delta_mode": "linear"}, "only applies to the teacher"),
        ({"teacher_tangent": "central"}, "is not one of"),
        ({"teacher_every_k_steps": 0}, "≥ 1"),
        (
            {
                "teacher_every_k_steps": 2,
                "delta_mode": "curvature_only",
                "curvature_weight": 1.0,
                "curvature_path": "x",
            },
            "only applies to the teacher",
        ),  # fmt: skip
        ({"teacher_every_k_steps": 2, "deepspeed": {"zero_optimization": {"stage": 2}}}, "DeepSpeed"),
    ],
)
def test_config_refuses_what_the_cheaper_teachers_cannot_do(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        delta_config(tmp_path, **overrides)


def test_config_refuses_fd_under_global_tf32_matmuls(tmp_path):
    previous = torch.get_float32_matmul_precision()
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with pytest.raises(ValueError, match="tf32"):
            delta_config(tmp_path, teacher_tangent="fd")
    finally:
        torch.set_float32_matmul_precision(previous)


def test_zero_stage_reader(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text('{"zero_optimization": {"stage": 3}}')
    assert deepspeed_zero_stage(str(path)) == 3
    assert deepspeed_zero_stage({"zero_optimization": {"stage": 2}}) == 2
    assert deepspeed_zero_stage(None) is None


def test_trainer_refuses_fd_on_bf16_weights(tiny_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="fp32/fp64"):
        _trainer(tiny_tokenizer, tmp_path, model_dtype=torch.bfloat16, teacher_tangent="fd")


# ---- the teacher on one step in k ---------------------------------------------------------------------------------


def _trainer(tokenizer, tmp_path, n=16, model_dtype=None, **config):
    torch.manual_seed(0)
    model = make_llama(seed=0)
    if model_dtype is not None:
        model = model.to(model_dtype)
    rows = addition_rows(tokenizer, n=n)
    return DeltaTrainer(
        model=model,
        args=delta_config(tmp_path, **config),
        train_dataset=Dataset.from_list(rows),
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )


def _randomize(model):
    torch.manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.2)


def _loss_and_grads(trainer, batch):
    trainer.model.train()
    trainer.model.zero_grad(set_to_none=True)
    n = supervised_mask(batch["labels"], shift=True).sum()
    loss = trainer.training_step(trainer.model, batch, n)
    grads = {k: None if p.grad is None else p.grad.clone() for k, p in trainer.model.named_parameters()}
    return loss, {k: g for k, g in grads.items() if "lora_" in k}


def test_every_k_on_a_teacher_step_is_exactly_the_k1_step(tiny_tokenizer, tmp_path):
    results = []
    for k in (1, 4):
        trainer = _trainer(tiny_tokenizer, tmp_path / str(k), teacher_every_k_steps=k, alpha_sampling="uniform")
        _randomize(trainer.model)
        batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        trainer.state.global_step = 8  # 8 % 4 == 0: a teacher step
        results.append(_loss_and_grads(trainer, batch))
    (loss1, grads1), (loss4, grads4) = results
    assert torch.equal(loss1, loss4)
    assert grads1.keys() == grads4.keys()
    for key in grads1:
        assert torch.equal(grads1[key], grads4[key]), key


@pytest.mark.parametrize("task_loss_at_alpha", [True, False])
def test_every_k_on_a_skipped_step_trains_the_student_on_its_task_loss_only(
    tiny_tokenizer, tmp_path, task_loss_at_alpha
):
    trainer = _trainer(
        tiny_tokenizer, tmp_path, teacher_every_k_steps=4, alpha_sampling="uniform", alpha_min=1.3, alpha_max=1.7,
        task_loss_at_alpha=task_loss_at_alpha,
    )  # fmt: skip
    model = trainer.model
    _randomize(model)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.state.global_step = 5  # 5 % 4 != 0: no teacher
    alpha = trainer._current_alpha()
    loss, grads = _loss_and_grads(trainer, batch)
    n = supervised_mask(batch["labels"], shift=True).sum()
    with torch.no_grad(), scaled_adapters(model, {"default": alpha if task_loss_at_alpha else 1.0}):
        expected = token_cross_entropy(model(**{k: v for k, v in batch.items() if k != "labels"}).logits,
                                       batch["labels"], shift=True, num_items=n)  # fmt: skip
    assert_close(loss, expected, rtol=1e-6, atol=1e-7)
    assert all(g is None for k, g in grads.items() if ".delta_teacher." in k)
    assert any(g is not None and g.abs().max() > 0 for k, g in grads.items() if ".default." in k)
    assert "delta/teacher_loss" not in trainer._metrics["train"]


def _train(tokenizer, tmp_path, max_steps, **config):
    trainer = _trainer(
        tokenizer, tmp_path, n=8, max_steps=max_steps, learning_rate=1e-2, weight_decay=0.1,
        lr_scheduler_type="constant", **config,
    )  # fmt: skip
    trainer.train()
    return {k: p.detach().clone() for k, p in trainer.model.named_parameters() if "lora_" in k}


def test_every_k_leaves_the_teacher_untouched_on_skipped_steps(tiny_tokenizer, tmp_path):
    """AdamW with weight decay: a zero gradient would still move the teacher, a dropped one does not."""
    one = _train(tiny_tokenizer, tmp_path / "a", 1, teacher_every_k_steps=3, per_device_train_batch_size=2)
    three = _train(tiny_tokenizer, tmp_path / "b", 3, teacher_every_k_steps=3, per_device_train_batch_size=2)
    four = _train(tiny_tokenizer, tmp_path / "c", 4, teacher_every_k_steps=3, per_device_train_batch_size=2)
    teacher = [k for k in one if ".delta_teacher." in k]
    assert teacher
    for key in teacher:
        assert torch.equal(one[key], three[key]), key  # steps 1 and 2 skipped the teacher
    assert any(not torch.equal(three[key], four[key]) for key in teacher)  # step 3 ran it
    assert any(not torch.equal(one[k], three[k]) for k in one if ".default." in k)  # the student trained


def test_every_k_keeps_gradient_accumulation_exact(tiny_tokenizer, tmp_path):
    config = {"teacher_every_k_steps": 2, "optim": "sgd", "max_grad_norm": 0.0}
    one = _train(tiny_tokenizer, tmp_path / "a", 2, per_device_train_batch_size=4, **config)
    two = _train(tiny_tokenizer, tmp_path / "b", 2, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                 **config)  # fmt: skip
    for key in one:
        assert_close(one[key], two[key], rtol=1e-5, atol=1e-6)


def test_fd_teacher_trains_end_to_end(tiny_tokenizer, tmp_path):
    exact = _train(tiny_tokenizer, tmp_path / "a", 2, per_device_train_batch_size=4)
    fd = _train(tiny_tokenizer, tmp_path / "b", 2, teacher_tangent="fd", per_device_train_batch_size=4)
    assert any(w.abs().max() > 0 for k, w in fd.items() if "lora_B.delta_teacher" in k)
    # step 0: a zero teacher (exact zero tangent); step 1: the FD error (~1e-3 relative) through Adam, which
    # normalises each gradient element, so a weight moves by up to lr·1e-3·O(1) = 1e-5..1e-4 (CPU-dependent rounding)
    for key in exact:
        assert_close(fd[key], exact[key], rtol=1e-3, atol=1e-4)
