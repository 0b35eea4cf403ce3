"""The linearized teacher against a weight-space JVP and central finite differences (fp64)."""

import pytest
import torch
from conftest import make_llama, make_student_and_teacher
from peft import LoraConfig, get_peft_model
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.testing import assert_close

from delta_trl.core.adapters import lora_layers, scaled_adapters, unparked
from delta_trl.core.linearize import linearized_forward, linearized_loss
from delta_trl.core.losses import token_cross_entropy


def _peft(kind: str, attn: str):
    return make_student_and_teacher(kind, attn=attn)


def _inputs(kind: str):
    torch.manual_seed(2)
    ids = torch.randint(2, 300, (2, 6))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0  # right padding
    labels = torch.randint(2, 300, (2, 4)) if kind == "t5" else ids.clone()
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _weight_space_jvp(model, inputs, adapter):
    """J·τ by differentiating the *base weights* along ΔW = s·B·A (torch.func.functional_call, dense tangents)."""
    base = model.get_base_model()
    kwargs = {k: v for k, v in inputs.items() if k != "labels"}
    if base.config.is_encoder_decoder:
        kwargs["decoder_input_ids"] = base.prepare_decoder_input_ids_from_labels(labels=inputs["labels"])
    names, primals, tangents = [], [], []
    for module_name, module in model.named_modules():
        if hasattr(module, "lora_A") and adapter in module.lora_A:
            names.append(f"{module_name}.base_layer.weight")
            primals.append(module.base_layer.weight.detach())
            tangents.append(module.get_delta_weight(adapter).detach())

    def f(*weights):
        params = dict(zip(names, weights, strict=True))
        with scaled_adapters(model, {"default": 0.0, adapter: 0.0}):
            return torch.func.functional_call(model, params, kwargs=kwargs).logits

    model.eval()
    with sdpa_kernel(SDPBackend.MATH):
        return torch.func.jvp(f, tuple(primals), tuple(tangents))


@pytest.mark.parametrize("kind", ["llama", "t5"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_tangent_equals_weight_space_jvp_and_finite_differences(kind, attn):
    model = _peft(kind, attn)
    inputs = _inputs(kind)
    with unparked(model, "teacher"):
        out = linearized_forward(model, inputs, "teacher")
        primal, tangent = _weight_space_jvp(model, inputs, "teacher")
        kwargs = {k: v for k, v in inputs.items() if not (k == "labels" and kind == "llama")}
        h = 1e-4
        with scaled_adapters(model, {"default": 0.0, "teacher": h}):
            plus = model(**kwargs).logits
        with scaled_adapters(model, {"default": 0.0, "teacher": -h}):
            minus = model(**kwargs).logits
    assert out.tangent_logits.abs().max() > 1e-3  # not vacuous
    assert_close(out.base_logits, primal, rtol=1e-10, atol=1e-10)
    assert_close(out.tangent_logits, tangent, rtol=1e-9, atol=1e-9)
    finite_difference = (plus - minus) / (2 * h)
    rel = (finite_difference - out.tangent_logits).norm() / out.tangent_logits.norm()
    # Llama's RoPE and T5's layer norm compute in fp32 even after .double(), which bounds the FD accuracy
    assert rel < 5e-4


def test_base_output_is_the_base_model_and_nothing_is_left_changed():
    model = _peft("llama", "sdpa")
    inputs = _inputs("llama")
    scalings_before = {id(m): dict(m.scaling) for m in lora_layers(model)}
    grads_before = {n: p.requires_grad for n, p in model.named_parameters()}
    model.train()
    with unparked(model, "teacher"):
        out = linearized_forward(model, inputs, "teacher", hidden_layers=(-1, 1))
    with model.disable_adapter():
        base = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], output_hidden_states=True)
    assert_close(out.base_logits, base.logits)
    assert_close(out.base_hidden[1], base.hidden_states[1])
    assert len(out.tangent_hidden) == 2
    assert model.training
    assert {id(m): dict(m.scaling) for m in lora_layers(model)} == scalings_before
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads_before


def test_gradients_reach_only_the_teacher_lora_weights():
    model = _peft("t5", "sdpa")
    inputs = _inputs("t5")
    with unparked(model, "teacher"):
        out = linearized_forward(model, inputs, "teacher")
    out.logits(alpha=1.5).pow(2).mean().backward()
    for name, param in model.named_parameters():
        has_grad = param.grad is not None and param.grad.abs().sum() > 0
        assert has_grad == (".teacher." in name), name


def test_works_with_activation_checkpointing_and_input_require_grads():
    """The hooks that gradient checkpointing puts on the input embeddings change neither the tangent nor its
    gradient, and stay in place."""
    inputs = _inputs("llama")
    plain = _peft("llama", "sdpa")
    with unparked(plain, "teacher"):
        reference = linearized_forward(plain, inputs, "teacher")
    expected = torch.autograd.grad(
        reference.tangent_logits.pow(2).sum(), [p for n, p in plain.named_parameters() if ".teacher." in n]
    )
    model = _peft("llama", "sdpa")
    base = model.get_base_model()
    base.activation_checkpointing_enable()
    base.enable_input_require_grads()
    model.train()
    with unparked(model, "teacher"):
        out = linearized_forward(model, inputs, "teacher")
    assert base.is_activation_checkpointing
    assert model.training
    assert base.get_input_embeddings()(inputs["input_ids"]).requires_grad  # the hook still works after the pass
    assert_close(out.tangent_logits, reference.tangent_logits, rtol=0, atol=0)
    got = torch.autograd.grad(
        out.tangent_logits.pow(2).sum(), [p for n, p in model.named_parameters() if ".teacher." in n]
    )
    for g, e in zip(got, expected, strict=True):
        assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_dora_and_unknown_adapters_are_refused():
    model = get_peft_model(make_llama(), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match="DoRA"):
        linearized_forward(model, _inputs("llama"), "default")
    with pytest.raises(ValueError, match="no adapter named"):
        linearized_forward(model, _inputs("llama"), "missing")


def test_flash_attention_is_refused():
    model = get_peft_model(make_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    model.get_base_model().config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="forward-mode AD"):
        linearized_forward(model, _inputs("llama"), "default")


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_linearized_loss_gives_the_gradient_of_backprop_through_the_jvp(kind):
    model = _peft(kind, "sdpa")
    inputs = _inputs(kind)
    shift = kind == "llama"

    def loss_fn(logits):
        return token_cross_entropy(logits, inputs["labels"], shift=shift)

    alpha = 1.3
    teacher = [p for n, p in model.named_parameters() if ".teacher." in n]
    with unparked(model, "teacher"):
        reference = loss_fn(linearized_forward(model, inputs, "teacher").logits(alpha))
        expected = torch.autograd.grad(reference, teacher)
        lin = linearized_forward(model, inputs, "teacher", differentiable=False)
        assert not lin.tangent_logits.requires_grad
        loss = linearized_loss(model, inputs, "teacher", lin, loss_fn, alpha)
        got = torch.autograd.grad(loss, teacher, allow_unused=True)
    assert_close(loss, reference.detach())
    assert max(g.abs().max() for g in expected) > 1e-3
    for g, e in zip(got, expected, strict=True):
        assert_close(g, e, rtol=1e-8, atol=1e-10)
    student = [p for n, p in model.named_parameters() if ".default." in n]
    with unparked(model, "teacher"):
        student_grads = torch.autograd.grad(
            linearized_loss(model, inputs, "teacher", lin, loss_fn, alpha), student, allow_unused=True
        )
    assert all(g is None or g.abs().max() == 0 for g in student_grads)
