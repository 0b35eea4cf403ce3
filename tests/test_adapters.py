"""Canaries for the one mechanism DELTA rides on: a LoRA adapter's scale moves the model along θ0 + c·τ."""

import copy

import pytest
import torch
from conftest import make_llama, make_t5
from peft import LoraConfig, get_peft_model
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.testing import assert_close

from delta_trl.core.adapters import (
    add_teacher_adapter,
    lora_layers,
    nominal_scaling,
    only_adapter,
    park_adapter,
    scale_multiplier,
    scaled_adapters,
    unparked,
)


def _model(kind: str, use_rslora: bool = False):
    base = make_llama() if kind == "llama" else make_t5()
    targets = ["q_proj", "v_proj", "down_proj"] if kind == "llama" else ["q", "v", "wo"]
    config = LoraConfig(r=4, lora_alpha=6, target_modules=targets, init_lora_weights=False, use_rslora=use_rslora)
    model = get_peft_model(base, config).double().eval()
    return model


def _batch(kind: str):
    torch.manual_seed(3)
    ids = torch.randint(2, 300, (2, 7))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if kind == "t5":
        batch["decoder_input_ids"] = torch.randint(2, 300, (2, 3))
    return batch


def _merged_logits(model, batch, factor: float) -> torch.Tensor:
    """Logits of the base model with the explicit weight sum W0 + factor·s·B·A in every LoRA layer."""
    dense = copy.deepcopy(model)
    with torch.no_grad():
        for layer in lora_layers(dense, "default"):
            layer.base_layer.weight += factor * layer.get_delta_weight("default")
    with dense.disable_adapter():
        return dense(**batch).logits


@pytest.mark.parametrize("kind", ["llama", "t5"])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_scaling_moves_the_model_along_the_task_vector(kind, use_rslora):
    """Canary: if PEFT stopped reading the scale we set (or computed it otherwise), these numbers would break."""
    model, batch = _model(kind, use_rslora), _batch(kind)
    for layer in lora_layers(model, "default"):
        assert nominal_scaling(layer, "default") == layer.scaling["default"]
        layer.set_scale("default", 1.0)
        assert nominal_scaling(layer, "default") == layer.scaling["default"]
    outputs = {}
    for factor in (0.0, 0.5, 1.0, 1.7):
        with torch.no_grad(), scaled_adapters(model, {"default": factor}):
            outputs[factor] = model(**batch).logits
        assert_close(outputs[factor], _merged_logits(model, batch, factor), rtol=1e-10, atol=1e-10)
    assert (outputs[1.0] - outputs[0.0]).abs().max() > 1e-3  # the scale really changes the output
    assert all(scale_multiplier(layer, "default") == 1.0 for layer in lora_layers(model))  # restored exactly


def test_scaled_adapters_nest_and_restore_on_error():
    model, batch = _model("llama"), _batch("llama")
    with torch.no_grad():
        reference, halfway = model(**batch).logits, _merged_logits(model, batch, 0.5)
        with scaled_adapters(model, {"default": 2.0}), scaled_adapters(model, {"default": 0.25}):
            assert all(
                scale_multiplier(layer, "default") == pytest.approx(0.5, rel=1e-15) for layer in lora_layers(model)
            )
            assert_close(model(**batch).logits, halfway, rtol=1e-10, atol=1e-10)
        with pytest.raises(RuntimeError, match="boom"), scaled_adapters(model, {"default": 3.0}):
            raise RuntimeError("boom")
        assert_close(model(**batch).logits, reference, rtol=0, atol=0)


def test_a_tensor_factor_gives_the_tangent():
    """The ε-trick through PEFT's set_scale: d/dε f(θ0 + ε·τ) at 0 equals (f(θ0 + h·τ) − f(θ0 − h·τ)) / 2h."""
    model, batch = _model("llama"), _batch("llama")

    def f(eps):
        with scaled_adapters(model, {"default": eps}):
            return model(**batch).logits

    zero = torch.zeros((), dtype=torch.float64)
    with sdpa_kernel(SDPBackend.MATH):  # the fused CPU kernel has no forward-mode AD
        primal, tangent = torch.func.jvp(f, (zero,), (torch.ones_like(zero),))
    h = 1e-3  # Llama's rotary tables are float32 even in a float64 model: a smaller h meets their rounding
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        central = (f(h) - f(-h)) / (2 * h)
    assert_close(tangent, central, rtol=0, atol=1e-4 * tangent.abs().max().item())
    assert_close(primal, _merged_logits(model, batch, 0.0), rtol=1e-10, atol=1e-10)


def test_parked_teacher_is_out_of_every_forward_until_unparked():
    model, batch = _model("llama"), _batch("llama")
    with torch.no_grad():
        student_only = model(**batch).logits
    add_teacher_adapter(model, "default", "teacher", teacher_r=2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".teacher." in name:
                param.normal_()
        assert_close(model(**batch).logits, student_only, rtol=0, atol=0)
        with unparked(model, "teacher"):
            assert all(
                layer.scaling["teacher"] == nominal_scaling(layer, "teacher")
                for layer in lora_layers(model, "teacher")
            )
            assert (model(**batch).logits - student_only).abs().max() > 1e-3
        assert_close(model(**batch).logits, student_only, rtol=0, atol=0)
    assert all(p.requires_grad for n, p in model.named_parameters() if ".teacher." in n or ".default." in n)
    park_adapter(model, "default")
    assert all(layer.scaling["default"] == 0.0 for layer in lora_layers(model, "default"))


def test_only_adapter_skips_the_zero_scaled_branches_bit_identically_and_restores_everything():
    model, batch = _model("llama"), _batch("llama")
    add_teacher_adapter(model, "default", "teacher", teacher_r=2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".teacher." in name:
                param.normal_()
    first_a = lora_layers(model)[0].lora_A["default"].weight
    first_a.requires_grad_(False)  # a user's frozen factor stays frozen
    flags = {name: param.requires_grad for name, param in model.named_parameters()}
    layers = lora_layers(model)
    active = [list(layer.active_adapters) for layer in layers]
    assert all(len(names) == 2 for names in active)
    with torch.no_grad(), unparked(model, "teacher"), scaled_adapters(model, {"default": 0.0}):
        both_running = model(**batch).logits
        with only_adapter(model, "teacher"):
            assert all(layer.active_adapters == ["teacher"] for layer in layers)
            teacher_only = model(**batch).logits
    assert torch.equal(teacher_only, both_running)  # + (B·A·x)·0 skipped: the same bits
    with pytest.raises(RuntimeError, match="inside"), only_adapter(model, "teacher"):
        raise RuntimeError("inside")
    assert [list(layer.active_adapters) for layer in layers] == active
    assert {name: param.requires_grad for name, param in model.named_parameters()} == flags
