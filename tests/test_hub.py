"""Hub push: the exact uploaded files, checked offline by patching HfApi and by staging to a local folder."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from conftest import make_llama
from huggingface_hub import HfApi
from peft import LoraConfig, get_peft_model

from delta_trl.hub import push_to_hub, stage_for_hub
from delta_trl.merging import merge_adapters


def front_matter(readme: str) -> dict:
    assert readme.startswith("---\n")
    return yaml.safe_load(readme.split("---\n")[1])


@pytest.fixture
def merged(tmp_path):
    paths = []
    for i, mode in enumerate(["delta", "linear"]):
        torch.manual_seed(i)
        config = LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
        model = get_peft_model(make_llama(), config)
        model.peft_config["default"].base_model_name_or_path = "org/tiny-llama"
        model.save_pretrained(tmp_path / f"t{i}")
        (tmp_path / f"t{i}" / "delta_trl.json").write_text(
            json.dumps({"delta_mode": mode, "evaluate_linearized": mode == "linear"})
        )
        paths.append(tmp_path / f"t{i}")
    merge_adapters(paths, [0.6, -0.4], tmp_path / "merged")
    return tmp_path / "merged"


def test_push_uploads_adapter_and_card(merged, tmp_path, monkeypatch):
    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = (repo_id, kwargs)

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        shutil.copytree(folder_path, tmp_path / "uploaded")
        calls["upload_folder"] = (repo_id, kwargs)
        return "https://huggingface.co/me/merged/commit/abc"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    url = push_to_hub(merged, "me/merged", results={"mean normalized accuracy (α=1)": 0.91234, "best α": 0.4})

    assert url.endswith("abc")
    assert calls["create_repo"][0] == "me/merged"
    assert calls["create_repo"][1]["exist_ok"] is True
    uploaded = tmp_path / "uploaded"
    assert sorted(p.name for p in uploaded.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "merge_report.json",
    ]
    readme = (uploaded / "README.md").read_text()
    meta = front_matter(readme)
    assert meta["base_model"] == "org/tiny-llama"
    assert meta["library_name"] == "peft"
    assert {"delta_trl", "task-arithmetic"} <= set(meta["tags"])
    assert "| 0.6 | delta |" in readme
    assert "| -0.4 | linear (evaluated linearized) |" in readme
    assert "task_arithmetic" in readme
    assert "| mean normalized accuracy (α=1) | 0.9123 |" in readme
    # The source folder is untouched (no README written into it).
    assert not (merged / "README.md").exists()

    staged = stage_for_hub(
        merged,
        tmp_path / "staged",
        repo_id="me/merged",
        results={"mean normalized accuracy (α=1)": 0.91234, "best α": 0.4},
    )
    for path in uploaded.iterdir():
        assert (staged / path.name).read_bytes() == path.read_bytes()


def test_single_task_vector_card(tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(make_llama(), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "task")
    with pytest.raises(ValueError, match="not a hub repo id"):
        stage_for_hub(tmp_path / "task", tmp_path / "out")
    with pytest.raises(ValueError, match="not a hub repo id"):
        stage_for_hub(tmp_path / "task", tmp_path / "out", base_model="/local/path/to/base")
    staged = stage_for_hub(tmp_path / "task", tmp_path / "out", base_model="org/tiny-llama")
    readme = (staged / "README.md").read_text()
    assert front_matter(readme)["base_model"] == "org/tiny-llama"
    assert "single task vector" in readme
    assert "unknown (no delta_trl.json)" in readme
    with pytest.raises(ValueError, match="already exists"):
        stage_for_hub(tmp_path / "task", tmp_path / "out", base_model="org/tiny-llama")


def test_folded_model_card(merged, tmp_path):
    adapters = [tmp_path / "t0", tmp_path / "t1"]
    merge_adapters(adapters, [1.0, 1.0], tmp_path / "model", fold_into_base=True, base_model=make_llama())
    staged = stage_for_hub(tmp_path / "model", tmp_path / "out")
    meta = front_matter((staged / "README.md").read_text())
    assert meta["library_name"] == "transformers"
    assert meta["base_model"] == "org/tiny-llama"
    assert (staged / "config.json").is_file()
