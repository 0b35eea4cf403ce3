"""The curvature cache: round trip, refusal of every mismatch or corruption, Hub I/O, load-or-estimate, CLI, DDP."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import TORCHRUN_TWO_PROCESSES, make_llama, make_tokenizer, run_worker
from datasets import Dataset
from huggingface_hub import HfApi
from peft import LoraConfig, get_peft_model
from torch.testing import assert_close

import delta_trl
from delta_trl._utils import sha256_file
from delta_trl.cli import main as cli_main
from delta_trl.core.fingerprint import base_model_fingerprint
from delta_trl.curvature.cache import (
    load_curvature,
    load_or_estimate_curvature,
    push_curvature_to_hub,
    save_curvature,
)
from delta_trl.curvature.estimation import estimate_curvature, texts_fingerprint
from delta_trl.curvature.factors import CurvatureFactors, LayerCurvature


ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["What is 2 + 3? 5.", "the cat sleeps", "premise: a man plays a guitar.", "yes no maybe", "Paris."]


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer(300)


@pytest.fixture(scope="module")
def factors(tokenizer):
    return estimate_curvature(
        make_llama(), tokenizer, TEXTS, target_modules=["q_proj", "v_proj"], max_length=8, progress=False
    )


def lora_model(targets=("q_proj", "v_proj"), seed=0):
    return get_peft_model(
        make_llama(seed=seed), LoraConfig(r=2, target_modules=list(targets), init_lora_weights=False)
    )


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


def test_round_trip_and_metadata(factors, tmp_path):
    path = save_curvature(factors, tmp_path / "curv")
    meta = json.loads((path / "curvature.json").read_text())
    assert meta["format_version"] == 2
    assert meta["estimator"] == "ekfac"
    assert meta["num_samples"] == len(TEXTS)
    assert meta["num_tokens"] == sum(min(8, len(ids)) for ids in make_tokenizer(300)(TEXTS)["input_ids"])
    assert meta["max_length"] == 8
    assert meta["dtype"] == "float32"
    assert meta["base_model"]["base_model_sha256"] == base_model_fingerprint(make_llama())
    assert meta["reference"]["texts_sha256"] == texts_fingerprint(TEXTS)
    assert meta["tensor_file"] == {
        "name": "curvature.safetensors",
        "bytes": (path / "curvature.safetensors").stat().st_size,
        "sha256": sha256_file(path / "curvature.safetensors"),
    }
    assert meta["target_modules"] == [
        f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")
    ]
    assert meta["delta_trl_version"] == delta_trl.__version__
    loaded = load_curvature(path, model=lora_model())
    assert loaded.module_names == factors.module_names
    for name, layer in factors.layers.items():
        for key, tensor in layer.tensors.items():
            assert torch.equal(loaded.layers[name].tensors[key], tensor)
    assert load_curvature(path, target_modules=["v_proj"]).module_names == [
        n for n in factors.module_names if "v_" in n
    ]
    assert load_curvature(path, model=lora_model(["q_proj"])).module_names == [
        n for n in factors.module_names if "q_" in n
    ]
    with pytest.raises(ValueError, match="already exists"):
        save_curvature(factors, path)
    save_curvature(factors, path, overwrite=True)
    assert leftovers(path) == []


def test_bf16_storage(tokenizer, tmp_path):
    factors = estimate_curvature(
        make_llama(), tokenizer, TEXTS, target_modules=["v_proj"], dtype="bf16", progress=False
    )
    assert {t.dtype for layer in factors.layers.values() for t in layer.tensors.values()} == {torch.bfloat16}
    loaded = load_curvature(save_curvature(factors, tmp_path / "bf16"))
    assert loaded.metadata["dtype"] == "bfloat16"
    assert loaded.size_report()[0]["bytes"] == 2 * (32 * 32 + 32 + 16 * 16 + 16 + 16 * 32)


def test_refuses_other_model_and_other_target_modules(factors, tmp_path):
    path = save_curvature(factors, tmp_path / "curv")
    with pytest.raises(ValueError, match="estimated on another model"):
        load_curvature(path, model=lora_model(seed=1))
    # same q/v weights, another MLP: the GGN of q/v differs, so the cache must not be used (the old hash of the target
    # modules alone accepted it)
    other = lora_model()
    with torch.no_grad():
        other.base_model.model.model.layers[0].mlp.up_proj.weight.mul_(1.5)
    with pytest.raises(ValueError, match="estimated on another model"):
        load_curvature(path, model=other)
    # the same weights in bf16 compute other numbers
    with pytest.raises(ValueError, match="estimated on another model"):
        load_curvature(path, model=lora_model().to(torch.bfloat16))
    with pytest.raises(ValueError, match=r"other target modules.*k_proj"):
        load_curvature(path, model=lora_model(["k_proj"]))
    with pytest.raises(ValueError, match=r"no factors for the target modules \['o_proj'\]"):
        load_curvature(path, target_modules=["q_proj", "o_proj"])


@pytest.mark.parametrize(
    "damage", ["truncate", "flip_byte", "format_version", "old_fingerprint", "bad_json", "missing_tensors"]
)
def test_refuses_corrupt_cache(factors, tmp_path, damage):
    path = save_curvature(factors, tmp_path / "curv")
    tensor_file, meta_file = path / "curvature.safetensors", path / "curvature.json"
    if damage == "truncate":
        tensor_file.write_bytes(tensor_file.read_bytes()[:-100])
        match = "truncated or altered"
    elif damage == "flip_byte":
        data = bytearray(tensor_file.read_bytes())
        data[-5] ^= 0xFF
        tensor_file.write_bytes(bytes(data))
        match = "truncated or altered"
    elif damage == "format_version":
        meta = json.loads(meta_file.read_text())
        meta["format_version"] = 99
        meta_file.write_text(json.dumps(meta))
        match = "format version 99"
    elif damage == "old_fingerprint":  # a version-1 cache identified the model by its target modules only
        meta = json.loads(meta_file.read_text())
        meta["format_version"] = 1
        meta["base_model"]["weights_sha256"] = meta["base_model"].pop("base_model_sha256")
        meta_file.write_text(json.dumps(meta))
        match = r"format version 1 \(it identifies the base model by its target modules only\).*Re-estimate"
    elif damage == "bad_json":
        meta_file.write_text(meta_file.read_text()[:50])
        match = "not valid JSON"
    else:
        tensor_file.unlink()
        match = "missing"
    with pytest.raises(ValueError, match=match):
        load_curvature(path)


def test_checksum_is_not_the_only_guard(factors, tmp_path):
    """A tensor file replaced by garbage whose size/sha256 were also rewritten is refused by the parser."""
    path = save_curvature(factors, tmp_path / "curv")
    tensor_file, meta_file = path / "curvature.safetensors", path / "curvature.json"
    tensor_file.write_bytes(b"not a safetensors file at all")
    meta = json.loads(meta_file.read_text())
    meta["tensor_file"] |= {"bytes": tensor_file.stat().st_size, "sha256": sha256_file(tensor_file)}
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="cannot be parsed as safetensors"):
        load_curvature(path)


def test_non_finite_statistics_are_refused_and_nothing_written(factors, tmp_path):
    name = factors.module_names[0]
    layers = dict(factors.layers)
    tensors = dict(layers[name].tensors)
    tensors["D"] = tensors["D"].clone()
    tensors["D"][0, 0] = float("nan")
    layers[name] = LayerCurvature("ekfac", tensors)
    with pytest.raises(ValueError, match="non-finite"):
        save_curvature(CurvatureFactors(layers, factors.metadata), tmp_path / "curv")
    assert not (tmp_path / "curv").exists()
    assert leftovers(tmp_path / "curv") == []


def test_overflowing_model_is_refused(tokenizer):
    model = make_llama()
    with torch.no_grad():
        model.model.embed_tokens.weight.fill_(float("inf"))
    with pytest.raises(ValueError, match="non-finite"):
        estimate_curvature(model, tokenizer, TEXTS, target_modules=["q_proj"], progress=False)


def test_reference_data_errors(tokenizer):
    model = make_llama()
    with pytest.raises(ValueError, match="reference set is empty"):
        estimate_curvature(model, tokenizer, [], target_modules=["q_proj"])
    with pytest.raises(ValueError, match="no text column 'text'"):
        estimate_curvature(model, tokenizer, Dataset.from_dict({"prompt": TEXTS}), target_modules=["q_proj"])
    with pytest.raises(ValueError, match="only 5 texts"):
        estimate_curvature(model, tokenizer, TEXTS, target_modules=["q_proj"], num_samples=6)
    with pytest.raises(ValueError, match="not a string"):
        estimate_curvature(model, tokenizer, ["ok", 3], target_modules=["q_proj"])
    with pytest.raises(ValueError, match="match no module"):
        estimate_curvature(model, tokenizer, TEXTS, target_modules=["nope"])
    kwargs = {"target_modules": ["q_proj"], "max_length": 8, "progress": False}
    from_column = estimate_curvature(
        model, tokenizer, Dataset.from_dict({"prompt": TEXTS}), text_column="prompt", **kwargs
    )
    from_list = estimate_curvature(model, tokenizer, TEXTS, **kwargs)
    assert from_column.metadata["reference"]["texts_sha256"] == from_list.metadata["reference"]["texts_sha256"]
    assert_close(from_column.layers[from_column.module_names[0]].tensors["D"], from_list.layers[from_list.module_names[0]].tensors["D"])  # fmt: skip
    assert estimate_curvature(model, tokenizer, TEXTS, num_samples=2, **kwargs).metadata["num_samples"] == 2


def test_push_to_hub_and_load_from_repo_id(factors, tmp_path, monkeypatch):
    path = save_curvature(factors, tmp_path / "curv")
    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = (repo_id, kwargs)

    def upload_folder(self, *, repo_id, folder_path, allow_patterns, **kwargs):
        shutil.copytree(folder_path, tmp_path / "hub", ignore=shutil.ignore_patterns(".*"))
        calls["upload_folder"] = (repo_id, allow_patterns)
        return "https://huggingface.co/me/curv/commit/abc"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    assert push_curvature_to_hub(path, "me/curv").endswith("abc")
    assert calls["create_repo"][0] == "me/curv"
    assert sorted(calls["upload_folder"][1]) == ["curvature.json", "curvature.safetensors"]

    downloads = []

    def snapshot_download(repo_id, allow_patterns=None, **kwargs):
        downloads.append(repo_id)
        return str(tmp_path / "hub")

    monkeypatch.setattr("huggingface_hub.snapshot_download", snapshot_download)
    monkeypatch.chdir(tmp_path)
    loaded = load_curvature("me/curv", model=lora_model())
    assert downloads == ["me/curv"]
    assert loaded.module_names == factors.module_names
    corrupt = tmp_path / "broken"
    shutil.copytree(path, corrupt)
    (corrupt / "curvature.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="truncated or altered"):
        push_curvature_to_hub(corrupt, "me/curv")


def test_load_or_estimate(tokenizer, tmp_path, monkeypatch):
    model = lora_model(["v_proj"])
    path = tmp_path / "curv"
    with pytest.raises(ValueError, match="no curvature cache"):
        load_or_estimate_curvature(model, path=path)
    first = load_or_estimate_curvature(model, path=path, reference=TEXTS, tokenizer=tokenizer, max_length=8)
    assert first.module_names == [f"model.layers.{i}.self_attn.v_proj" for i in range(2)]
    assert (path / "curvature.safetensors").is_file()

    def no_estimation(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr("delta_trl.curvature.estimation.estimate_curvature", no_estimation)
    second = load_or_estimate_curvature(model, path=path, reference=TEXTS, tokenizer=tokenizer)
    assert_close(second.layers[first.module_names[0]].tensors["D"], first.layers[first.module_names[0]].tensors["D"])
    with pytest.raises(ValueError, match="another model"):
        load_or_estimate_curvature(lora_model(["v_proj"], seed=3), path=path)

    class Wrapper(torch.nn.Module):  # the shape of DDP: the model is `.module`, names gain a `module.` prefix
        def __init__(self, module):
            super().__init__()
            self.module = module

    wrapped = load_or_estimate_curvature(Wrapper(model), path=path)
    assert wrapped.module_names == first.module_names


def test_cli_on_a_local_model_and_jsonl(tmp_path, capsys):
    model_dir = tmp_path / "model"
    make_llama().save_pretrained(model_dir)
    make_tokenizer(300).save_pretrained(model_dir)
    data = tmp_path / "ref.jsonl"
    data.write_text("".join(json.dumps({"content": t}) + "\n" for t in TEXTS))
    args = ["curvature", "--model", str(model_dir), "--dataset", str(data), "--text-column", "content",
            "--target-modules", "q_proj", "v_proj", "--num-samples", "4", "--max-length", "8", "--batch-size", "2",
            "--estimator", "kfac", "--dtype", "bf16", "--output", str(tmp_path / "curv")]  # fmt: skip
    assert cli_main(args) == 0
    assert "written" in capsys.readouterr().out
    loaded = load_curvature(tmp_path / "curv", model=lora_model())
    assert loaded.estimator == "kfac"
    assert loaded.metadata["num_samples"] == 4
    assert next(iter(loaded.layers.values())).tensors["A"].dtype == torch.bfloat16
    assert cli_main(args) == 2  # exists: refused with a one-line error
    assert "already exists" in capsys.readouterr().err
    assert cli_main([*args[:4], str(tmp_path / "missing.jsonl"), *args[5:-1], str(tmp_path / "x")]) != 0


@pytest.mark.distributed
def test_two_processes_equal_one_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    worker = str(ROOT / "tests" / "curvature_worker.py")
    run_worker([*TORCHRUN_TWO_PROCESSES, worker, str(tmp_path / "ddp")], env)
    run_worker([sys.executable, worker, str(tmp_path / "single")], env)
    ddp, single = load_curvature(tmp_path / "ddp"), load_curvature(tmp_path / "single")
    assert ddp.metadata["world_size"] == 2
    assert single.metadata["world_size"] == 1
    assert ddp.metadata["base_model"] == single.metadata["base_model"]
    assert ddp.metadata["reference"] == single.metadata["reference"]
    # fp32 sums reduced in another order across ranks: rounding of ~1e-5 relative on entries that partly cancel
    # (1.3e-5 measured on one CPU); a wrong shard or a missing sample would be off by percents
    for name, layer in single.layers.items():
        assert_close(ddp.layers[name].A, layer.A, rtol=1e-4, atol=1e-7)
        assert_close(ddp.layers[name].G, layer.G, rtol=1e-4, atol=1e-7)
        assert_close(
            ddp.layers[name].tensors["D"], layer.tensors["D"], rtol=1e-3, atol=1e-3 * layer.tensors["D"].max()
        )
