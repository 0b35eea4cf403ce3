"""The embedded SmolLM2: conversion cache verification, and the real model itself (prepared by scripts/setup.sh)."""

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from conftest import make_llama, make_tokenizer

from delta_trl import embedded
from delta_trl._utils import sha256_file
from delta_trl.embedded import load_model_and_tokenizer, verify_embedded_model


def _fake_conversion(folder, create=True):
    if create:
        folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"0123456789")
    manifest = {
        "version": embedded.MANIFEST_VERSION,
        "sha256": {"model.safetensors": sha256_file(folder / "model.safetensors")},
        "sizes": {"model.safetensors": 10},
    }
    (folder / embedded.MANIFEST).write_text(json.dumps(manifest))


def test_verification_detects_truncated_altered_and_incomplete_folders(tmp_path):
    folder = tmp_path / "conv"
    _fake_conversion(folder)
    verify_embedded_model(folder)
    (folder / "model.safetensors").write_bytes(b"012345678")
    with pytest.raises(ValueError, match="truncated or altered"):
        verify_embedded_model(folder)
    (folder / "model.safetensors").write_bytes(b"0123456780")
    with pytest.raises(ValueError, match="truncated or altered"):
        verify_embedded_model(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="missing"):
        verify_embedded_model(folder)
    (folder / embedded.MANIFEST).unlink()
    with pytest.raises(ValueError, match="not a complete"):
        verify_embedded_model(folder)


def test_missing_or_broken_conversion_is_rebuilt_atomically(tmp_path, monkeypatch):
    """Converted once, reused while it verifies, rebuilt in place (no leftovers) when altered; modes follow umask."""
    calls = []

    def fake_convert(gguf, folder):
        calls.append(gguf.name)
        _fake_conversion(folder, create=False)

    monkeypatch.setattr(embedded, "_gguf_path", lambda: Path("/nowhere/fake.gguf"))
    monkeypatch.setattr(embedded, "_convert", fake_convert)
    old_mask = os.umask(0o027)
    try:
        target = embedded.prepare_embedded_model(tmp_path)
    finally:
        os.umask(old_mask)
    assert target == tmp_path / "smollm2-135m-instruct"
    assert calls == ["fake.gguf"]
    assert stat.S_IMODE(target.stat().st_mode) == 0o750
    assert stat.S_IMODE((target / "model.safetensors").stat().st_mode) == 0o640
    assert embedded.prepare_embedded_model(tmp_path) == target
    assert calls == ["fake.gguf"]
    (target / "model.safetensors").write_bytes(b"0123456780")
    assert embedded.prepare_embedded_model(tmp_path) == target
    assert calls == ["fake.gguf", "fake.gguf"]
    verify_embedded_model(target)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != ".smollm2-135m-instruct.lock") == [
        "smollm2-135m-instruct"
    ]
    embedded.prepare_embedded_model(tmp_path, force=True)
    assert len(calls) == 3


def test_a_local_folder_loads_like_a_hub_id(tmp_path):
    model, tokenizer = make_llama(), make_tokenizer()
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    loaded, loaded_tokenizer = load_model_and_tokenizer(str(tmp_path / "m"))
    ids = torch.tensor([[3, 4, 5]])
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert loaded_tokenizer("What is 2 + 3?").input_ids == tokenizer("What is 2 + 3?").input_ids


@pytest.mark.embedded
def test_embedded_model_is_the_real_smollm2():
    model, tokenizer = load_model_and_tokenizer("embedded")
    assert model.config.hidden_size == 576
    assert model.config.num_hidden_layers == 30
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, inputs["input_ids"].shape[1] :])
