"""``delta-trl merge`` / ``delta-trl evaluate`` end to end on tiny local models."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_llama
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaForCausalLM

from delta_trl.cli import main
from delta_trl.core.fingerprint import base_model_fingerprint
from delta_trl.merging.adapter_io import load_adapter


@pytest.fixture
def workspace(tmp_path, tiny_tokenizer):
    """A saved base model + tokenizer, two adapters recording it, and word-labelled validation files."""
    base_dir = tmp_path / "base"
    make_llama().save_pretrained(base_dir)
    tiny_tokenizer.save_pretrained(base_dir)
    for i, name in enumerate(["x", "y"]):
        torch.manual_seed(30 + i)
        config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        model = get_peft_model(LlamaForCausalLM.from_pretrained(base_dir), config)
        model.save_pretrained(tmp_path / name)
    rows = [("the cat sleeps", "yes"), ("the cat runs", "no"), ("a man plays a guitar", "yes")]
    for name in ["x", "y", "control"]:
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    return tmp_path


def test_help_is_available(capsys):
    for command in ["merge", "evaluate"]:
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert "examples:" in capsys.readouterr().out


def test_merge_command_writes_loadable_adapter(workspace, capsys):
    out = workspace / "merged"
    code = main(["merge", str(workspace / "x"), str(workspace / "y"), "-c", "0.5", "-1", "--output", str(out)])
    assert code == 0
    assert str(out) in capsys.readouterr().out
    report = json.loads((out / "merge_report.json").read_text())
    assert [v["coefficient"] for v in report["task_vectors"]] == [0.5, -1.0]
    merged = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(workspace / "base"), out)
    assert merged.peft_config["default"].r == 4


def test_merge_command_folds_into_recorded_base(workspace):
    """The base is loaded from adapter_config's base_model_name_or_path; W = θ0 + 2·s·B·A on every target."""
    out = workspace / "folded"
    code = main(["merge", str(workspace / "x"), "-c", "2", "--fold-into-base", "--output", str(out)])
    assert code == 0
    theta0 = LlamaForCausalLM.from_pretrained(workspace / "base").state_dict()
    folded = LlamaForCausalLM.from_pretrained(out).state_dict()
    deltas = {
        k.removeprefix("base_model.model.") + ".weight": v
        for k, v in load_adapter(workspace / "x").task_vector().items()
    }
    assert len(deltas) == 4
    for key, value in folded.items():
        torch.testing.assert_close(value, theta0[key] + 2.0 * deltas.get(key, 0.0), rtol=1e-5, atol=1e-6)


def test_merge_command_refuses_to_fold_linear_adapters_or_another_base(workspace, capsys):
    fingerprint = base_model_fingerprint(LlamaForCausalLM.from_pretrained(workspace / "base"))
    marker = {"delta_mode": "linear", "evaluate_linearized": True, "base_model_sha256": fingerprint}
    (workspace / "x" / "delta_trl.json").write_text(json.dumps(marker))
    out = workspace / "folded"
    assert main(["merge", str(workspace / "x"), "--fold-into-base", "--output", str(out)]) == 2
    assert "trained in `linear` mode" in capsys.readouterr().err
    assert not out.exists()

    marker["evaluate_linearized"], marker["delta_mode"] = False, "delta"
    (workspace / "x" / "delta_trl.json").write_text(json.dumps(marker))
    other = make_llama(seed=5)
    other.save_pretrained(workspace / "other")
    code = main(["merge", str(workspace / "x"), "--fold-into-base", "--base-model", str(workspace / "other"), "-o", str(out)])  # fmt: skip
    assert code == 2
    assert "not the one the adapters were trained on" in capsys.readouterr().err
    assert not out.exists()
    assert main(["merge", str(workspace / "x"), "--fold-into-base", "--output", str(out)]) == 0  # the recorded base


def test_merge_command_reports_bad_input(workspace, capsys):
    out = workspace / "merged"
    code = main(["merge", str(workspace / "x"), str(workspace / "y"), "-c", "1", "--output", str(out)])
    assert code == 2
    assert "one per adapter" in capsys.readouterr().err
    assert not out.exists()
    out.mkdir()
    assert main(["merge", str(workspace / "x"), "--output", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_evaluate_command_addition_and_negation(workspace, capsys):
    adapters = ["--adapter", f"x={workspace / 'x'}", "--adapter", f"y={workspace / 'y'}"]
    data = ["--data", f"x={workspace / 'x.jsonl'}", "--data", f"y={workspace / 'y.jsonl'}"]
    out = workspace / "eval"
    code = main(["evaluate", "--base-model", str(workspace / "base"), *adapters, *data, "--alphas", "0.5", "1.0", "-o", str(out)])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "best α" in printed
    assert "α = 1" in printed
    sweep = json.loads((out / "alpha_sweep.json").read_text())
    assert sweep["alphas"] == [0.5, 1.0]
    assert (out / "alpha_sweep.png").is_file()

    code = main(
        ["evaluate", "--base-model", str(workspace / "base"), "--adapter", f"x={workspace / 'x'}", "--negate", "x",
         "--data", f"x={workspace / 'x.jsonl'}", "--data", f"control={workspace / 'control.jsonl'}",
         "--alphas", "1.0", "-o", str(workspace / "neg")]
    )  # fmt: skip
    assert code == 0
    negation = json.loads((workspace / "neg" / "negation.json").read_text())
    assert negation["alphas"] == [0.0, 1.0]
    assert (workspace / "neg" / "negation.png").is_file()


def test_evaluate_command_rejects_integer_labels_without_words(workspace, capsys):
    (workspace / "int.jsonl").write_text(json.dumps({"text": "a", "label": 1}) + "\n")
    code = main(
        ["evaluate", "--base-model", str(workspace / "base"), "--adapter", f"x={workspace / 'x'}",
         "--data", f"x={workspace / 'int.jsonl'}", "--alphas", "1.0"]
    )  # fmt: skip
    assert code == 2
    assert "integer labels" in capsys.readouterr().err
