"""base_model_fingerprint: a content hash of every base weight and buffer, blind to PEFT adapters and to names' origin."""

from __future__ import annotations

import hashlib
import time

import pytest
import torch
from conftest import make_llama
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM

from delta_trl.core import fingerprint
from delta_trl.core.fingerprint import base_model_fingerprint, base_tensors


# The format is a contract: adapters and curvature caches record this hash. Changing the format invalidates them.
PINNED = "f57133e8ce6827c6c24712275c2d4fdfeecb18ad38e05cbaaa52b0ab29e4c3d6"


def by_hand(named: list[tuple[str, torch.Tensor]]) -> str:
    """The documented format: per tensor, sorted by name, ``name\\0dtype\\0shape\\0nbytes\\0`` then the raw bytes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(named, key=lambda item: item[0]):
        data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        dtype = str(tensor.dtype).removeprefix("torch.")
        digest.update(f"{name}\0{dtype}\0{tuple(tensor.shape)}\0{len(data)}\0".encode() + data)
    return digest.hexdigest()


def test_hash_of_a_small_module_by_hand():
    """Linear(2, 1) with a buffer: weight [[1, -2]] fp32, bias [0.5], buffer `scale` = 3 (int64)."""
    module = torch.nn.Linear(2, 1)
    with torch.no_grad():
        module.weight.copy_(torch.tensor([[1.0, -2.0]]))
        module.bias.copy_(torch.tensor([0.5]))
    module.register_buffer("scale", torch.tensor(3))
    expected = by_hand(
        [("weight", torch.tensor([[1.0, -2.0]])), ("bias", torch.tensor([0.5])), ("scale", torch.tensor(3))]
    )
    assert base_model_fingerprint(module) == expected == PINNED


def test_llama_hash_covers_every_parameter_and_buffer_once():
    model = make_llama()
    names = [name for name, _ in base_tensors(model)]
    # embed_tokens and lm_head are not tied in the tiny Llama; the rotary inv_freq buffer is included
    assert len(names) == len(dict(model.named_parameters())) + len(dict(model.named_buffers()))
    assert "model.rotary_emb.inv_freq" in names
    assert base_model_fingerprint(model) == by_hand(list(base_tensors(model)))


def test_peft_wrapping_and_adapters_do_not_change_the_hash():
    plain = base_model_fingerprint(make_llama())
    model = get_peft_model(make_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.add_adapter("other", LoraConfig(r=3, target_modules=["v_proj", "o_proj"], init_lora_weights=False))
    assert base_model_fingerprint(model, use_cache=False) == plain
    names = [name for name, _ in base_tensors(model)]
    assert "model.layers.0.self_attn.q_proj.weight" in names
    assert not [n for n in names if "lora" in n or "base_layer" in n]


def test_any_changed_weight_buffer_or_dtype_changes_the_hash(tmp_path):
    reference = base_model_fingerprint(make_llama())
    assert base_model_fingerprint(make_llama()) == reference  # same seed, same content, another object
    model = make_llama()
    model.save_pretrained(tmp_path / "m")
    assert base_model_fingerprint(LlamaForCausalLM.from_pretrained(tmp_path / "m")) == reference

    for edit in ("mlp", "norm", "buffer"):
        other = make_llama()
        with torch.no_grad():
            if edit == "mlp":  # not a LoRA target in any test: the old curvature hash missed this
                other.model.layers[1].mlp.down_proj.weight[0, 0] += 1e-3
            elif edit == "norm":
                other.model.norm.weight[3] = 0.5
            else:
                other.model.rotary_emb.inv_freq[0] += 1.0
        assert base_model_fingerprint(other) != reference, edit
    assert base_model_fingerprint(make_llama().to(torch.bfloat16)) != reference


def test_cache_is_reused_and_invalidated_by_in_place_edits(monkeypatch):
    model = make_llama()
    first = base_model_fingerprint(model)
    calls = []
    real = hashlib.sha256
    monkeypatch.setattr(fingerprint.hashlib, "sha256", lambda *a: calls.append(1) or real(*a))
    assert base_model_fingerprint(model) == first
    assert calls == []  # served from the cache
    with torch.no_grad():
        model.model.norm.weight.mul_(2.0)  # bumps the version counter
    changed = base_model_fingerprint(model)
    assert calls == [1]
    assert changed != first
    with torch.no_grad():
        model.model.norm.weight.div_(2.0)
    assert base_model_fingerprint(model) == first
    model.model.norm.weight.data.mul_(3.0)  # `.data` bypasses the version counter: only use_cache=False sees it
    assert base_model_fingerprint(model) == first
    assert base_model_fingerprint(model, use_cache=False) != first


def test_meta_tensors_are_refused():
    with torch.device("meta"):
        model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="meta device"):
        base_model_fingerprint(model)


@pytest.mark.slow
@pytest.mark.embedded
def test_embedded_model_hash_time():
    """SmolLM2-135M (513 MiB fp32): one pass over every tensor, then the cache."""
    from delta_trl.embedded import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer("embedded")
    start = time.perf_counter()
    value = base_model_fingerprint(model)
    first = time.perf_counter() - start
    start = time.perf_counter()
    assert base_model_fingerprint(model) == value
    cached = time.perf_counter() - start
    print(f"embedded fingerprint: {first:.2f} s, cached {cached * 1e3:.1f} ms")
    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    assert base_model_fingerprint(peft_model, use_cache=False) == value
