"""`delta-trl experiment`: the experiment file's checks, the validation split, the results schema, exact merges, α
chosen on validation only, reuse and resume, refusal of an output folder holding another experiment."""

import dataclasses
import json
import math
import os
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TORCHRUN_TWO_PROCESSES, make_t5, make_tokenizer, run_worker
from peft import PeftModel
from transformers import AutoModelForCausalLM

from delta_trl.errors import UserError
from delta_trl.evaluation import task_scores
from delta_trl.experiment import runner
from delta_trl.experiment.config import load_config, parse_config
from delta_trl.experiment.runner import run_experiment, split_validation


def _rows(kind: str, n: int, offset: int = 0) -> list[dict]:
    """A closed-set tagging task the tiny model can move on: the completion is determined by the prompt's number."""
    words = {"parity": (" even", " odd"), "size": (" small", " large")}[kind]
    out = []
    for i in range(offset, offset + n):
        label = words[i % 2] if kind == "parity" else words[int(i >= offset + n // 2)]
        out.append({"prompt": f"{kind} {i} is", "completion": label})
    return out


def _write_task(folder, kind: str, n_train: int = 40, n_test: int = 12) -> str:
    folder.mkdir(parents=True)
    for split, rows in (("train", _rows(kind, n_train)), ("test", _rows(kind, n_test, offset=1000))):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(folder)


def _config(tmp_path, model_dir, **overrides) -> dict:
    raw = {
        "model": model_dir,
        "methods": ["nonlinear", "delta"],
        "tasks": [
            {"name": "parity", "path": _write_task(tmp_path / "parity", "parity")},
            {"name": "size", "path": _write_task(tmp_path / "size", "size")},
        ],
        "lora": {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]},
        "training": {
            "max_steps": 3,
            "per_device_train_batch_size": 4,
            "learning_rate": 0.05,
            "max_length": 32,
            "use_cpu": True,
            "bf16": False,
            "logging_steps": 1,
            "disable_tqdm": True,
        },  # fmt: skip
        "evaluation": {"alphas": [0.5, 1.0, 1.5], "validation_size": 8, "disentanglement_alphas": [0.0, 1.0]},
        "output_dir": str(tmp_path / "run"),
    }
    raw.update(overrides)
    return raw


# ---- the experiment file ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"methdos": ["delta"]}, "unknown key `methdos` \\(did you mean `methods`\\?\\)"),
        ({"methods": ["delta", "lora"]}, "unknown method `lora`"),
        ({"methods": ["delta", "delta"]}, "lists a method twice"),
        ({"training": {"learning_rat": 1e-3}}, "`learning_rat` is not a field .*did you mean `learning_rate`"),
        ({"training": {"output_dir": "x"}}, "`output_dir` is set by the experiment runner"),
        ({"training": {"delta_mode": "linear"}}, "`delta_mode` is set by the experiment runner"),
        ({"training": {"learning_rate": "fast"}}, "training.learning_rate: give a number, got 'fast'"),
        ({"training": {"max_steps": 2.5}}, "training.max_steps: give a whole number"),
        ({"training": {"bf16": "no"}}, "training.bf16: give true or false"),
        ({"lora": {"rank": 4}}, "lora: unknown key `rank`"),
        ({"evaluation": {"alphas": []}}, "evaluation.alphas: give a non-empty list"),
        ({"evaluation": {"alphas": [0.5, "x"]}}, "evaluation.alphas: every entry must be a number"),
        ({"evaluation": {"validation_size": 0}}, "validation_size: give a positive whole number"),
        ({"method_training": {"detla": {"learning_rate": 1e-3}}}, "unknown method `detla` \\(did you mean `delta`"),
        ({"push_method": "linear"}, "push_method `linear` is not one of the methods"),
        ({"tasks": []}, "`tasks` is required"),
    ],
)
def test_bad_experiment_files_are_refused_with_the_key(tmp_path, change, message):
    raw = {"model": "embedded", "tasks": ["builtin:sentiment"], "methods": ["nonlinear", "delta"], **change}
    with pytest.raises(UserError, match=message):
        parse_config(raw, "exp.yaml")


def test_overrides_and_per_method_training(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"model": "embedded", "tasks": ["builtin:sentiment"],
                                    "training": {"learning_rate": 1e-3, "max_steps": 5},
                                    "method_training": {"delta": {"learning_rate": 5e-4}}}))  # fmt: skip
    config = load_config(path, ["training.max_steps=7", "methods=[nonlinear, delta]", "evaluation.alphas=[0.5, 1]"])
    assert config.methods == ("nonlinear", "delta")
    assert config.training_for("nonlinear") == {"learning_rate": 1e-3, "max_steps": 7}
    assert config.training_for("delta") == {"learning_rate": 5e-4, "max_steps": 7}
    assert config.evaluation.alphas == (0.5, 1.0)
    # running a subset of the methods keeps the file's sections of the others (the shipped study runs `--methods`)
    only = load_config(path, ["methods=[nonlinear]"])
    assert only.methods == ("nonlinear",)
    assert only.method_training["delta"] == {"learning_rate": 5e-4}
    # YAML 1.1 (PyYAML's default) reads `3e-4` as text; the file and --set read it as the number users mean.
    assert load_config(path, ["training.learning_rate=3e-4"]).training["learning_rate"] == 3e-4
    path.write_text("model: embedded\ntasks: [builtin:sentiment]\ntraining: {learning_rate: 2e-5, max_steps: 3}\n")
    assert load_config(path).training == {"learning_rate": 2e-5, "max_steps": 3}
    with pytest.raises(UserError, match="write KEY=VALUE"):
        load_config(path, ["training.max_steps"])
    with pytest.raises(UserError, match="no such experiment file"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_validation_split_is_disjoint_by_prompt_and_seeded():
    rows = [{"prompt": f"p{i % 30}", "completion": str(i)} for i in range(60)]  # every prompt twice
    train, validation = split_validation(rows, size=10, seed=3)
    assert {r["prompt"] for r in train}.isdisjoint({r["prompt"] for r in validation})
    assert len(validation) == 10
    assert len(train) == 50
    assert split_validation(rows, size=10, seed=3) == (train, validation)
    assert split_validation(rows, size=10, seed=4)[1] != validation
    assert len(split_validation(rows, size=1000, seed=3)[1]) == 12  # at most a fifth of the rows


# ---- end to end on a tiny Llama --------------------------------------------------------------------------------------


def _scored_calls(monkeypatch) -> list[tuple[str, dict]]:
    """Record (first prompt, factors) of every point scored; the split is recognised by the prompts it holds."""
    calls = []
    original = task_scores.score_task_many

    def spy(model, tokenizer, data, factor_sets, **kwargs):
        calls.extend((data.prompts[0], dict(factors)) for factors in factor_sets)
        return original(model, tokenizer, data, factor_sets, **kwargs)

    monkeypatch.setattr(task_scores, "score_task_many", spy)
    return calls


def test_experiment_end_to_end_schema_exact_merge_and_alpha_on_validation(tmp_path, tiny_model_dir, monkeypatch):
    raw = _config(tmp_path, tiny_model_dir)
    calls = _scored_calls(monkeypatch)
    results = run_experiment(parse_config(raw, "exp.yaml"))
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["tasks"] == ["parity", "size"]
    assert set(saved["zero_shot"]) == {"parity", "size"}
    assert set(saved["methods"]) == {"nonlinear", "delta"}
    assert saved["config"]["methods"] == ["nonlinear", "delta"]
    assert "torch" in saved["versions"]
    for method, r in saved["methods"].items():
        individual = r["individual"]
        for key in ("merged_alpha_1", "merged_best"):
            merged = r[key]
            for task, score in merged["per_task"].items():
                assert merged["normalized_per_task"][task] == pytest.approx(score / individual[task])
            assert merged["mean_absolute"] == pytest.approx(sum(merged["per_task"].values()) / 2)
            assert merged["mean_normalized"] == pytest.approx(sum(merged["normalized_per_task"].values()) / 2)
        # α* is the argmax of the validation curve (first in grid order on ties)
        curve = r["validation"]["mean_normalized"]
        assert r["merged_best"]["alpha"] == r["validation"]["alphas"][curve.index(max(curve))]
        assert (tmp_path / "run" / "figures" / method / "alpha_sweep.png").is_file()
        assert (tmp_path / "run" / "figures" / method / "disentanglement_error.png").is_file()
    assert results["methods"]["delta"]["individual"] == saved["methods"]["delta"]["individual"]
    text = (tmp_path / "run" / "results.md").read_text()
    assert "| delta | parity |" in text
    assert "mean norm." in text

    # the test split is scored only at θ0, at each τ_t alone, at α = 1 and at α* (never during the α sweep)
    test_prompts = {"parity 1000 is", "size 1000 is"}
    for prompt, factors in calls:
        if prompt in test_prompts:
            values = set(factors.values())
            allowed = {0.0, 1.0} | {r["merged_best"]["alpha"] for r in saved["methods"].values()}
            assert values <= allowed, factors
    sweep = [f for p, f in calls if p not in test_prompts and len(set(f.values())) == 1 and len(f) == 2]
    assert {next(iter(f.values())) for f in sweep} == {0.5, 1.0, 1.5}

    # the merged adapter is stock PEFT and is exactly θ0 + α*·(τ_parity + τ_size)
    method = "delta"
    alpha = saved["methods"][method]["merged_best"]["alpha"]
    ids = torch.tensor([[5, 9, 14, 3, 7]])
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                       str(tmp_path / "run" / "merged" / method)).eval()  # fmt: skip
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    state = dict(base.state_dict())
    for task in ("parity", "size"):
        vector = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                           str(tmp_path / "run" / "vectors" / method / task)).merge_and_unload()  # fmt: skip
        for name, value in vector.state_dict().items():
            state[name] = state[name] + alpha * (value - base.state_dict()[name])
    base.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, base.eval()(input_ids=ids).logits,
                                   atol=1e-5, rtol=1e-5)  # fmt: skip
    assert "α* (chosen on validation)" in (tmp_path / "run" / "merged" / method / "README.md").read_text()


@pytest.mark.slow
def test_rerun_reuses_and_a_killed_training_resumes(tmp_path, tiny_model_dir, monkeypatch, capsys):
    raw = _config(tmp_path, tiny_model_dir, methods=["delta"])
    raw["training"] |= {"max_steps": 4, "save_steps": 2}
    reference = dict(raw, output_dir=str(tmp_path / "uninterrupted"))
    run_experiment(parse_config(reference, "exp.yaml"))

    from delta_trl.training.trainer_base import DeltaTrainerMixin

    original_step = DeltaTrainerMixin.training_step
    seen = {"n": 0}

    def dies_at_step_3(self, *args, **kwargs):
        seen["n"] += 1
        if seen["n"] == 3:
            raise KeyboardInterrupt("killed")
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(DeltaTrainerMixin, "training_step", dies_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(parse_config(raw, "exp.yaml"))
    folder = tmp_path / "run" / "vectors" / "delta" / "parity"
    assert (folder / "checkpoint-2").is_dir()
    assert not (folder / "vector.json").exists()
    monkeypatch.setattr(DeltaTrainerMixin, "training_step", original_step)
    capsys.readouterr()
    results = run_experiment(parse_config(raw, "exp.yaml"))
    assert "resuming from" in capsys.readouterr().out
    assert json.loads((folder / "vector.json").read_text())["steps"] == 4
    assert not list(folder.glob("checkpoint-*"))
    from safetensors.torch import load_file

    for task in ("parity", "size"):
        resumed = load_file(tmp_path / "run" / "vectors" / "delta" / task / "adapter_model.safetensors")
        straight = load_file(tmp_path / "uninterrupted" / "vectors" / "delta" / task / "adapter_model.safetensors")
        for name in straight:
            torch.testing.assert_close(resumed[name], straight[name], atol=1e-6, rtol=1e-5)

    # a rerun trains nothing and evaluates nothing again
    def must_not_run(*args, **kwargs):
        raise AssertionError("reran work that was done")

    monkeypatch.setattr(runner, "train_vector", must_not_run)
    monkeypatch.setattr(runner, "evaluate_method", must_not_run)
    again = run_experiment(parse_config(raw, "exp.yaml"))
    assert again["methods"]["delta"]["individual"] == results["methods"]["delta"]["individual"]


def test_an_output_folder_of_another_experiment_is_refused_before_training(tmp_path, tiny_model_dir, monkeypatch):
    raw = _config(tmp_path, tiny_model_dir, methods=["nonlinear"])
    raw["training"]["max_steps"] = 1
    run_experiment(parse_config(raw, "exp.yaml"))
    adapter = tmp_path / "run" / "vectors" / "nonlinear" / "parity" / "adapter_model.safetensors"
    before = adapter.read_bytes()
    monkeypatch.setattr(runner, "train_vector", lambda *a, **k: pytest.fail("trained before refusing"))
    changed = dict(raw, training={**raw["training"], "learning_rate": 0.01})
    with pytest.raises(UserError, match="holds a different experiment.*nonlinear/parity.*training"):
        run_experiment(parse_config(changed, "exp.yaml"))
    assert adapter.read_bytes() == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds no experiment"):
        run_experiment(parse_config(dict(raw, output_dir=str(tmp_path / "other")), "exp.yaml"))


def test_bad_tasks_and_targets_fail_before_training(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(runner, "train_vector", lambda *a, **k: pytest.fail("trained before refusing"))
    raw = _config(tmp_path, tiny_model_dir)
    with pytest.raises(UserError, match="unknown preset|not a known preset|Unknown preset|unknown"):
        run_experiment(parse_config(dict(raw, tasks=[{"name": "x", "preset": "snly"}]), "exp.yaml"))
    with pytest.raises(UserError, match="lora.target_modules"):
        run_experiment(parse_config(dict(raw, lora={"r": 2, "target_modules": ["nope_proj"]}), "exp.yaml"))
    bad = dict(raw, training={**raw["training"], "beta": 0.1})  # a DPO field on a completion task
    with pytest.raises(UserError, match="do not apply to DeltaSFTConfig"):
        run_experiment(parse_config(bad, "exp.yaml"))
    assert not (tmp_path / "run").exists()


# ---- T5 and DPO ------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_t5_on_an_nli_preset_from_a_local_copy(tmp_path):
    model_dir = tmp_path / "t5"
    make_t5().save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    snli = tmp_path / "snli"
    snli.mkdir()
    for split, n in (("train", 40), ("validation", 8), ("test", 12)):
        rows = [{"premise": f"a man {i}", "hypothesis": f"a person {i}", "label": [0, 1, 2, -1][i % 4]}
                for i in range(n)]  # fmt: skip
        (snli / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = {
        "model": str(model_dir),
        "methods": ["nonlinear", "delta"],
        "tasks": [
            {"name": "snli", "preset": "snli", "path": str(snli)},
            {"name": "snli_b", "preset": "snli", "path": str(snli), "max_train": 20},
        ],  # fmt: skip
        "lora": {"r": 2, "lora_alpha": 4, "target_modules": ["q", "v"]},
        "training": {
            "max_steps": 2,
            "per_device_train_batch_size": 4,
            "learning_rate": 0.01,
            "max_length": 32,
            "use_cpu": True,
            "disable_tqdm": True,
        },  # fmt: skip
        "evaluation": {"alphas": [0.5, 1.0], "validation_size": 5, "disentanglement_alphas": [0.0, 1.0]},
        "output_dir": str(tmp_path / "run"),
    }
    results = run_experiment(parse_config(raw, "nli.yaml"))
    assert results["rows"]["snli"]["test"] == 9  # the unlabelled (-1) rows are dropped
    for r in results["methods"].values():
        assert set(r["individual"]) == {"snli", "snli_b"}
        assert all(0.0 <= v <= 1.0 for v in r["individual"].values())


@pytest.mark.slow
def test_dpo_experiment_reports_reward_accuracy_margins_and_the_front(tmp_path, tiny_model_dir):
    tasks = []
    for name, long_is_better in (("helpful", False), ("verbose", True)):
        folder = tmp_path / name
        folder.mkdir()
        for split, n, offset in (("train", 30, 0), ("test", 8, 1000)):
            rows = []
            for i in range(offset, offset + n):
                short, long = f" {i}.", f" the answer is {i} and that is all."
                chosen, rejected = (long, short) if long_is_better else (short, long)
                rows.append({"prompt": f"What is {i}?", "chosen": chosen, "rejected": rejected})
            (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        tasks.append({"name": name, "path": str(folder)})
    raw = _config(tmp_path, tiny_model_dir, tasks=tasks)
    raw["training"] = {"max_steps": 2, "per_device_train_batch_size": 2, "learning_rate": 0.01, "beta": 0.1,
                       "max_length": 64, "use_cpu": True, "bf16": False, "disable_tqdm": True}  # fmt: skip
    raw["evaluation"] = {"alphas": [0.5, 1.0], "validation_size": 6, "front_coefficients": [-1.0, 0.0, 1.0]}
    results = run_experiment(parse_config(raw, "dpo.yaml"))
    assert results["kind"] == "preference"
    assert results["zero_shot"] == {"helpful": 0.5, "verbose": 0.5}  # θ0's implicit reward margins are all 0
    for r in results["methods"].values():
        assert set(r["mean_margin"]["individual"]) == {"helpful", "verbose"}
        front = r["front"]
        assert front["coefficients"] == [-1.0, 0.0, 1.0]
        assert len(front["score"]["helpful"]) == 3
        assert all(math.isfinite(v) for v in front["mean_margin"]["verbose"])
    assert (tmp_path / "run" / "figures" / "delta" / "coefficient_front.png").is_file()


def test_shipped_experiment_files_parse():
    files = sorted(Path("recipes/configs/experiments").glob("*.yaml"))
    assert {f.name for f in files} >= {"smoke_embedded.yaml", "dpo_smoke_embedded.yaml", "nli_t5.yaml",
                                       "dpo_help_verb.yaml"}  # fmt: skip
    for path in files:
        config = load_config(path)
        assert config.methods
        assert config.tasks
        for method in config.methods:  # every training field belongs to the trainer config the tasks will use
            kind = "dpo" if "dpo" in path.name else ("seq2seq" if "t5" in config.model else "sft")
            accepted = {f.name for f in runner.dataclasses.fields(runner.config_class(kind))} | {"max_length"}
            assert set(config.training_for(method)) <= accepted, (path, method)


@pytest.mark.distributed
def test_experiment_under_torchrun_two_processes(tmp_path, tiny_model_dir):
    """Two gloo ranks train every task vector together; the main process alone evaluates, merges and reports."""
    raw = _config(tmp_path, tiny_model_dir)
    raw["training"] |= {"per_device_train_batch_size": 2, "max_steps": 2}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(raw))
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    result = run_worker([*TORCHRUN_TWO_PROCESSES, "-m", "delta_trl.experiment", str(path)], env)
    assert result.stdout.count("| method | mean individual |") == 1  # one report, from the main process
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(results["methods"]) == {"nonlinear", "delta"}
    for method in ("nonlinear", "delta"):
        for task in ("parity", "size"):
            record = json.loads((tmp_path / "run" / "vectors" / method / task / "vector.json").read_text())
            assert record["steps"] == 2
        assert (tmp_path / "run" / "merged" / method / "adapter_model.safetensors").is_file()


def test_push_needs_a_hub_base_and_uploads_the_chosen_merge(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(runner, "train_vector", lambda *a, **k: pytest.fail("trained before refusing"))
    raw = _config(tmp_path, tiny_model_dir, push_to_hub="me/merged")
    with pytest.raises(UserError, match="push_to_hub"):  # a local base folder cannot be named in a Hub card
        run_experiment(parse_config(raw, "exp.yaml"))
    assert not (tmp_path / "run").exists()

    import delta_trl.hub

    uploads = []
    monkeypatch.setattr(delta_trl.hub, "push_to_hub", lambda folder, repo, **kw: uploads.append((folder, repo, kw)))
    config = parse_config(dict(raw, methods=["nonlinear", "delta"]), "exp.yaml")
    results = {"tasks": ["parity"], "zero_shot": {"parity": 0.5}, "methods": {m: {
        "individual": {"parity": 1.0}, "merged_alpha_1": {"per_task": {"parity": 0.9}, "mean_normalized": 0.9},
        "merged_best": {"alpha": 0.5, "per_task": {"parity": 1.0}, "mean_normalized": 1.0}} for m in config.methods}}  # fmt: skip
    runner.push(config, results)
    folder, repo, kw = uploads[0]
    assert (Path(folder).name, repo) == ("delta", "me/merged")  # delta when trained, by default
    assert kw["results"]["α* (chosen on validation)"] == 0.5
    runner.push(dataclasses.replace(config, push_method="nonlinear"), results)
    assert Path(uploads[1][0]).name == "nonlinear"
