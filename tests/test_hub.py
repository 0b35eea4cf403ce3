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
from delta_trl.merging.merge import merge_adapters


def front_matter(readme: str) -> dict:
    assert readme.startswith("---\n")
    return yaml.safe_load(readme.split("---\n")[1])


@pytest.fixture
def merged(tmp_path):
    paths = []
    for i, mode in enumerate(["delta", "nonlinear"]):  # merging refuses linear + ordinary
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
        "delta_trl.json",
        "merge_report.json",
    ]
    readme = (uploaded / "README.md").read_text()
    meta = front_matter(readme)
    assert meta["base_model"] == "org/tiny-llama"
    assert meta["library_name"] == "peft"
    assert {"delta_trl", "task-arithmetic"} <= set(meta["tags"])
    assert "| 0.6 | delta |" in readme
    assert "| -0.4 | nonlinear |" in readme
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
    (tmp_path / "task" / "delta_trl.json").write_text(
        json.dumps({"delta_mode": "linear", "evaluate_linearized": True})
    )
    readme = (
        stage_for_hub(tmp_path / "task", tmp_path / "linear", base_model="org/tiny-llama") / "README.md"
    ).read_text()
    assert "| `task` | 1 | linear (evaluated linearized) |" in readme
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


# ---- adapters trained on the embedded model -------------------------------------------------------------------------


@pytest.fixture
def fake_embedded(tmp_path, monkeypatch):
    """`embedded` is the tiny Llama in a verified cache (DELTA_TRL_CACHE points at it)."""
    from fake_embedded import install_fake_embedded

    monkeypatch.setenv("DELTA_TRL_CACHE", str(tmp_path / "cache"))
    return install_fake_embedded(tmp_path / "cache")


def _embedded_adapter(folder, cache_dir):
    torch.manual_seed(0)
    model = get_peft_model(make_llama(), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    model.peft_config["default"].base_model_name_or_path = str(cache_dir)  # what training on `embedded` records
    model.save_pretrained(folder)
    (folder / "delta_trl.json").write_text(json.dumps({"delta_mode": "delta"}))
    return folder


def test_card_of_an_embedded_adapter_names_the_hub_origin(fake_embedded, tmp_path):
    adapter = _embedded_adapter(tmp_path / "task", fake_embedded)
    source_config = (adapter / "adapter_config.json").read_bytes()
    staged = stage_for_hub(adapter, tmp_path / "out", repo_id="me/sunny")
    readme = (staged / "README.md").read_text()
    assert front_matter(readme)["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "dequantised to float32 from the Q4_1 GGUF `SmolLM2-135M-Instruct.Q4_1.gguf`" in readme
    assert 'load_model_and_tokenizer("embedded")' in readme
    assert str(fake_embedded) not in readme
    staged_config = json.loads((staged / "adapter_config.json").read_text())
    assert staged_config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert (adapter / "adapter_config.json").read_bytes() == source_config  # the source folder is untouched
    # the staged adapter still loads with stock PEFT, on the same base
    from peft import PeftModel

    loaded = PeftModel.from_pretrained(make_llama(), staged)
    assert loaded.peft_config["default"].base_model_name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_stage_for_hub_base_model_is_written_into_the_adapter_config(fake_embedded, tmp_path):
    adapter = _embedded_adapter(tmp_path / "task", fake_embedded)
    staged = stage_for_hub(adapter, tmp_path / "other", base_model="org/other-base")
    assert front_matter((staged / "README.md").read_text())["base_model"] == "org/other-base"
    assert json.loads((staged / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/other-base"
    staged = stage_for_hub(adapter, tmp_path / "named", base_model="embedded")
    assert front_matter((staged / "README.md").read_text())["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_merged_embedded_adapters_card(fake_embedded, tmp_path):
    adapters = [_embedded_adapter(tmp_path / f"t{i}", fake_embedded) for i in range(2)]
    merge_adapters(adapters, [0.5, 0.5], tmp_path / "merged")
    staged = stage_for_hub(tmp_path / "merged", tmp_path / "out")
    assert front_matter((staged / "README.md").read_text())["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    config = json.loads((staged / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"


def _recipe_args(tmp_path, *extra):
    from recipes import sft_delta

    return sft_delta.make_parser().parse_args_and_config(
        ["--config", "recipes/configs/sft_delta.yaml", "--use_cpu", "true", "--disable_tqdm", "true",
         "--model_name_or_path", "embedded", "--output_dir", str(tmp_path / "run"), "--max_steps", "1",
         "--num_train_examples", "8", "--num_eval_examples", "4", "--push_to_hub", "true",
         "--hub_model_id", "me/sunny", *extra]
    )  # fmt: skip


def test_recipe_pushes_after_training_with_the_embedded_card(fake_embedded, tmp_path, monkeypatch):
    from recipes import sft_delta

    calls = []

    def create_repo(self, repo_id, **kwargs):
        # called once, after training: the adapter is already saved (no push at trainer construction)
        assert (tmp_path / "run" / "adapter_model.safetensors").is_file()
        calls.append(("create_repo", repo_id))

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        shutil.copytree(folder_path, tmp_path / "uploaded")
        calls.append(("upload_folder", repo_id))
        return "https://huggingface.co/me/sunny/commit/abc"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    results = sft_delta.main(*_recipe_args(tmp_path))
    assert calls == [("create_repo", "me/sunny"), ("upload_folder", "me/sunny")]
    readme = (tmp_path / "uploaded" / "README.md").read_text()
    assert front_matter(readme)["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert f"| held-out accuracy, task vector | {results['eval_accuracy_task_vector']:.4g} |" in readme
    config = json.loads((tmp_path / "uploaded" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    local = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert local["base_model_name_or_path"] == str(fake_embedded)


def test_recipe_push_failure_is_one_line_after_training(fake_embedded, tmp_path, monkeypatch, capfd):
    from delta_trl.errors import run_cli
    from recipes import sft_delta

    def create_repo(self, repo_id, **kwargs):
        raise ConnectionError("Failed to establish a new connection: [Errno 101] Network is unreachable")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    argv = ["--config", "recipes/configs/sft_delta.yaml", "--use_cpu", "true", "--disable_tqdm", "true",
            "--model_name_or_path", "embedded", "--output_dir", str(tmp_path / "run"), "--max_steps", "1",
            "--num_train_examples", "8", "--num_eval_examples", "4", "--push_to_hub", "true",
            "--hub_model_id", "me/sunny", "--report_to", "none"]  # fmt: skip
    capfd.readouterr()
    assert run_cli(sft_delta.cli, argv) == 2
    err_lines = capfd.readouterr().err.strip().splitlines()
    assert err_lines[-1].startswith(
        f"error: {tmp_path / 'run'} is complete, but uploading it to the Hub repo 'me/sunny'"
    )
    assert not any(line.startswith("error:") for line in err_lines[:-1])
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()
    assert json.loads((tmp_path / "run" / "results.json").read_text())["steps"] == 1


def test_recipe_refuses_push_from_a_local_base_before_training(tmp_path):
    from delta_trl.errors import UserError
    from recipes import sft_delta

    make_llama().save_pretrained(tmp_path / "local")
    args = sft_delta.make_parser().parse_args_and_config(
        ["--config", "recipes/configs/sft_delta.yaml", "--model_name_or_path", str(tmp_path / "local"),
         "--output_dir", str(tmp_path / "run"), "--push_to_hub", "true", "--hub_model_id", "me/x"]
    )  # fmt: skip
    with pytest.raises(UserError, match="--push_to_hub: The base model is .* not a Hub repo id"):
        sft_delta.main(*args)
    assert not (tmp_path / "run").exists()
