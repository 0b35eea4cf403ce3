"""One error surface: every user error of the recipes and of ``delta-trl`` is one ``error:`` line, exit status 2, no
traceback, and leaves the folder as it was.

Each case runs in this process through the same entry points as the command line (``run_cli`` / ``delta_trl.cli.main``,
stderr captured at the file-descriptor level, so progress bars and warnings count); the ``slow`` variant runs every
case again as a real command line (``python recipes/sft_delta.py ...``, ``delta-trl ...``). A few real command lines
run in the default selection too, for the wiring (``__main__``, exit status, ``--debug``, ``DELTA_TRL_DEBUG``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from conftest import make_llama, make_tokenizer
from huggingface_hub import HfApi
from peft import LoraConfig, get_peft_model

from delta_trl import cli
from delta_trl.errors import UserError, run_cli, user_errors
from recipes import dpo_delta, sft_delta


REPO = Path(__file__).resolve().parents[1]
PYTHON = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv" / "bin" / "python").exists() else sys.executable
SFT_CONFIG = str(REPO / "recipes" / "configs" / "sft_delta.yaml")
DPO_CONFIG = str(REPO / "recipes" / "configs" / "dpo_delta.yaml")
SFT = ["--config", SFT_CONFIG, "--use_cpu", "true", "--model_name_or_path", "{ws}/tiny", "--output_dir", "{ws}/out"]
DPO = ["--config", DPO_CONFIG, "--use_cpu", "true", "--model_name_or_path", "{ws}/tiny", "--output_dir", "{ws}/out"]
EVALUATE = ["evaluate", "--base-model", "{ws}/tiny", "--data", "x={ws}/val.jsonl"]


@dataclass(frozen=True)
class Case:
    name: str
    program: str  # "sft", "dpo" or "delta-trl"
    argv: list[str]
    expect: str  # a substring of the one error line
    env: dict[str, str] = field(default_factory=dict)


CASES = [
    # recipes: flags and configuration values that cannot work, refused at parse time
    Case("bad choice", "sft", [*SFT, "--delta_mode", "bogus"], "--delta_mode/--delta-mode: invalid choice: 'bogus'"),
    Case("bad int", "sft", [*SFT, "--max_steps", "abc"], "invalid int value: 'abc'"),
    Case("negative steps", "sft", [*SFT, "--max_steps", "-5"], "--max_steps -5: give a positive number"),
    Case("zero lr", "sft", [*SFT, "--learning_rate", "0"], "--learning_rate 0.0: must be > 0"),
    Case("zero batch", "sft", [*SFT, "--per_device_train_batch_size", "0"], "--per_device_train_batch_size 0"),
    Case("unknown flag", "sft", [*SFT, "--bogus_flag", "1"], "['--bogus_flag', '1']"),
    Case("missing config", "sft", ["--config", "{ws}/nope.yaml"], "nope.yaml"),
    Case("inverted alpha", "sft", [*SFT, "--alpha_min", "2", "--alpha_max", "0.5"], "[2.0, 0.5] is empty or inverted"),
    Case("dora", "sft", [*SFT, "--use_dora", "true"], "--use_dora: DoRA"),
    Case("no lora", "sft", [*SFT, "--use_peft", "false"], "pass --use_peft"),
    Case("push without repo", "sft", [*SFT, "--push_to_hub", "true"], "--push_to_hub needs --hub_model_id"),
    # recipes: data, model and output folder
    Case("missing data", "sft", [*SFT, "--dataset_name", "{ws}/missing.jsonl"], "missing.jsonl' does not exist"),
    Case("bad jsonl", "sft", [*SFT, "--dataset_name", "{ws}/bad.jsonl"], "bad.jsonl:2: not valid JSON"),
    Case(
        "wrong columns",
        "sft",
        [*SFT, "--dataset_name", "{ws}/val.jsonl"],
        "val.jsonl:1 lacks the column(s) ['completion', 'prompt']",
    ),  # fmt: skip
    Case(
        "wrong type", "sft", [*SFT, "--dataset_name", "{ws}/numbers.jsonl"], "numbers.jsonl:1: `completion` is a int"
    ),
    Case(
        "unknown target",
        "sft",
        [*SFT, "--lora_target_modules", "q_proj", "qv_proj"],
        "--lora_target_modules: qv_proj matches no module",
    ),  # fmt: skip
    Case(
        "unknown single target",
        "sft",
        [*SFT, "--lora_target_modules", "qv_proj"],
        "--lora_target_modules: qv_proj matches no module",
    ),  # fmt: skip
    Case("existing output", "sft", [*SFT[:-1], "{ws}/existing"], "existing is not empty"),
    Case("model folder", "sft", [*SFT[:4], "--model_name_or_path", "{ws}/nowhere/model"], "no such folder"),
    Case(
        "hub model",
        "sft",
        [*SFT[:4], "--model_name_or_path", "nobody/no-such-model"],
        "--model_name_or_path nobody/no-such-model: ",
    ),  # fmt: skip
    Case("dpo builtin", "dpo", [*DPO, "--dataset_name", "builtin:polite"], "builtin:helpful and builtin:verbose"),
    Case("dpo beta", "dpo", [*DPO, "--beta", "-1"], "--beta -1.0: must be > 0"),
    Case(
        "dpo columns",
        "dpo",
        [*DPO, "--dataset_name", "{ws}/half_prefs.jsonl"],
        "half_prefs.jsonl:1 lacks the column(s) ['rejected']",
    ),  # fmt: skip
    # delta-trl sft / dpo: the recipes behind the command line, same errors
    Case("sft command", "delta-trl", ["sft", *SFT, "--max_steps", "-5"], "--max_steps -5: give a positive number"),
    Case(
        "sft command data",
        "delta-trl",
        ["sft", *SFT, "--dataset_name", "{ws}/bad.jsonl"],
        "bad.jsonl:2: not valid JSON",
    ),
    Case(
        "dpo command",
        "delta-trl",
        ["dpo", *DPO, "--dataset_name", "builtin:polite"],
        "builtin:helpful and builtin:verbose",
    ),
    # delta-trl
    Case("no command", "delta-trl", [], "the following arguments are required: COMMAND"),
    Case(
        "unknown merge flag",
        "delta-trl",
        ["merge", "{ws}/x", "-o", "{ws}/m", "--bogus"],
        "unrecognized arguments: --bogus",
    ),
    Case("merge choice", "delta-trl", ["merge", "{ws}/x", "-o", "{ws}/m", "--method", "avg"], "invalid choice: 'avg'"),
    Case("merge float", "delta-trl", ["merge", "{ws}/x", "-o", "{ws}/m", "-c", "one"], "invalid float value: 'one'"),
    Case(
        "merge truncated",
        "delta-trl",
        ["merge", "{ws}/x", "{ws}/truncated", "-o", "{ws}/m"],
        "truncated/adapter_model.safetensors' is not a complete safetensors file",
    ),  # fmt: skip
    Case("merge dora", "delta-trl", ["merge", "{ws}/x", "{ws}/dora", "-o", "{ws}/m"], "DoRA"),
    Case("merge existing", "delta-trl", ["merge", "{ws}/x", "-o", "{ws}/existing"], "--overwrite"),
    Case(
        "merge hub adapter",
        "delta-trl",
        ["merge", "nobody/no-such-adapter", "-o", "{ws}/m"],
        "'nobody/no-such-adapter' is neither a local adapter folder nor a downloadable hub repo",
    ),  # fmt: skip
    Case(
        "merge push base",
        "delta-trl",
        ["merge", "{ws}/x", "-o", "{ws}/m", "--push-to-hub", "me/m"],
        "not a Hub repo id",
    ),  # fmt: skip
    Case(
        "evaluate truncated",
        "delta-trl",
        [*EVALUATE, "--adapter", "x={ws}/truncated"],
        "not a complete safetensors file",
    ),  # fmt: skip
    Case(
        "evaluate bad jsonl",
        "delta-trl",
        [*EVALUATE[:-1], "x={ws}/bad.jsonl", "--adapter", "x={ws}/x"],
        "bad.jsonl:2: not valid JSON",
    ),  # fmt: skip
    Case(
        "evaluate hub base",
        "delta-trl",
        ["evaluate", "--base-model", "nobody/no-such-model", "--data", "x={ws}/val.jsonl", "--adapter", "x={ws}/x"],
        "--base-model nobody/no-such-model: ",
    ),  # fmt: skip
    Case(
        "evaluate batch",
        "delta-trl",
        [*EVALUATE, "--adapter", "x={ws}/x", "--batch-size", "0"],
        "--batch-size 0: must be > 0",
    ),  # fmt: skip
    Case(
        "curvature target",
        "delta-trl",
        [
            "curvature",
            "--model",
            "{ws}/tiny",
            "--dataset",
            "{ws}/texts.jsonl",
            "--target-modules",
            "qq_proj",
            "-o",
            "{ws}/c",
        ],
        "--target-modules: qq_proj matches no module",
    ),  # fmt: skip
    Case(
        "curvature data",
        "delta-trl",
        [
            "curvature",
            "--model",
            "{ws}/tiny",
            "--dataset",
            "{ws}/bad.jsonl",
            "--target-modules",
            "q_proj",
            "-o",
            "{ws}/c",
        ],
        "bad.jsonl:2: not valid JSON",
    ),  # fmt: skip
    Case(
        "curvature samples",
        "delta-trl",
        [
            "curvature",
            "--model",
            "{ws}/tiny",
            "--dataset",
            "{ws}/texts.jsonl",
            "--target-modules",
            "q_proj",
            "-o",
            "{ws}/c",
            "--num-samples",
            "-3",
        ],
        "--num-samples -3: must be > 0",
    ),  # fmt: skip
]


def _save_adapter(folder: Path, seed: int, **lora) -> None:
    torch.manual_seed(seed)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, **lora)
    get_peft_model(make_llama(), config).save_pretrained(folder)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A tiny model folder, adapters (plain, DoRA, truncated weights), good and bad data files, a non-empty folder."""
    ws = tmp_path_factory.mktemp("ws")
    make_llama().save_pretrained(ws / "tiny")
    make_tokenizer(vocab_size=300).save_pretrained(ws / "tiny")
    _save_adapter(ws / "x", 0)
    _save_adapter(ws / "dora", 1, use_dora=True)
    shutil.copytree(ws / "x", ws / "truncated")
    weights = ws / "truncated" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    (ws / "val.jsonl").write_text(
        '{"text": "the cat sleeps", "label": "yes"}\n{"text": "the cat runs", "label": "no"}\n'
    )
    (ws / "bad.jsonl").write_text('{"text": "a", "label": "yes"}\n{"text": "b", "label": "no"\n')
    (ws / "numbers.jsonl").write_text('{"prompt": "1 + 1 =", "completion": 2}\n')
    (ws / "half_prefs.jsonl").write_text('{"prompt": "p", "chosen": " a"}\n')
    (ws / "texts.jsonl").write_text("".join(json.dumps({"text": f"text number {i}"}) + "\n" for i in range(4)))
    (ws / "existing").mkdir()
    (ws / "existing" / "keep.txt").write_text("keep me")
    return ws


def _state(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def _argv(case: Case, ws: Path) -> list[str]:
    return [a.format(ws=ws) for a in case.argv]


def _assert_one_error_line(code: int, err: str, case: Case) -> None:
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    assert case.expect in lines[0], err


def _in_process(program: str, argv: list[str]) -> int:
    try:
        if program == "delta-trl":
            return cli.main(argv)
        return run_cli({"sft": sft_delta, "dpo": dpo_delta}[program].cli, argv)
    except SystemExit as exit_:  # argparse errors and --help exit from inside the parser
        return int(exit_.code)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_user_error_is_one_line(case, workspace, capfd, monkeypatch):
    monkeypatch.chdir(workspace)
    for key, value in case.env.items():
        monkeypatch.setenv(key, value)
    before = _state(workspace)
    capfd.readouterr()
    code = _in_process(case.program, _argv(case, workspace))
    out, err = capfd.readouterr()
    _assert_one_error_line(code, err, case)
    assert _state(workspace) == before


def _command(case: Case, ws: Path) -> list[str]:
    if case.program == "delta-trl":
        return [PYTHON, "-m", "delta_trl.cli", *_argv(case, ws)]
    return [PYTHON, str(REPO / "recipes" / f"{case.program}_delta.py"), *_argv(case, ws)]


def _run(command: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), **env}
    if "DELTA_TRL_DEBUG" not in env:
        environ.pop("DELTA_TRL_DEBUG", None)
    return subprocess.run(command, cwd=cwd, env=environ, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_user_error_is_one_line_on_the_command_line(case, workspace):
    before = _state(workspace)
    result = _run(_command(case, workspace), workspace, **case.env)
    _assert_one_error_line(result.returncode, result.stderr, case)
    assert _state(workspace) == before


@pytest.mark.slow  # a fresh interpreter imports torch, transformers and TRL: 5-25 s
def test_recipe_command_line_bad_choice_is_one_line(workspace):
    """The 150-line usage is not printed: one line, exit status 2."""
    result = _run([PYTHON, str(REPO / "recipes" / "sft_delta.py"), *_argv(CASES[0], workspace)], workspace)
    _assert_one_error_line(result.returncode, result.stderr, CASES[0])
    assert result.stdout == ""


@pytest.mark.slow  # a fresh interpreter imports torch, transformers and TRL: 5-25 s
def test_delta_trl_sft_and_dpo_run_the_recipes_on_the_command_line(workspace):
    """`delta-trl sft|dpo ARGS` hand ARGS to the recipes' parsers: their --help (exit 0), their one-line errors."""
    delta_trl = str(REPO / ".venv" / "bin" / "delta-trl")
    for command, own_flag in (("sft", "--num_train_examples"), ("dpo", "--beta")):
        result = _run([delta_trl, command, "--help"], workspace)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"usage: delta-trl {command} ")
        for flag in ("--dataset_name", "--dataset_config", "--dataset_train_split", "--dataset_test_split",
                     "--delta_mode", "--lora_r", own_flag):  # fmt: skip
            assert flag in result.stdout, (command, flag)
    bad = _run([delta_trl, "sft", *_argv(CASES[0], workspace)], workspace)
    _assert_one_error_line(bad.returncode, bad.stderr, CASES[0])
    assert bad.stderr.strip().endswith("(see delta-trl sft --help)")
    assert bad.stdout == ""
    refused = _run([delta_trl, "dpo", *[a.format(ws=workspace) for a in DPO], "--beta", "-1"], workspace)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == ["error: --beta -1.0: must be > 0."]


def test_delta_trl_help_imports_no_torch():
    code = "import sys; from delta_trl.cli import make_parser; make_parser(); print('torch' in sys.modules)"
    assert _run([PYTHON, "-c", code], REPO).stdout.strip() == "False"


@pytest.mark.slow  # a fresh interpreter imports torch, transformers and TRL: 5-25 s
def test_debug_flag_shows_the_traceback(workspace):
    case = next(c for c in CASES if c.name == "merge truncated")
    result = _run([str(REPO / ".venv" / "bin" / "delta-trl"), *_argv(case, workspace), "--debug"], workspace)
    assert result.returncode == 2
    assert "Traceback (most recent call last)" in result.stderr
    assert "SafetensorError" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")


def test_debug_environment_variable_shows_the_traceback(workspace, capfd, monkeypatch):
    monkeypatch.setenv("DELTA_TRL_DEBUG", "1")
    capfd.readouterr()
    code = run_cli(sft_delta.cli, [*[a.format(ws=workspace) for a in SFT], "--max_steps", "-5"])
    err = capfd.readouterr().err
    assert code == 2
    assert "Traceback (most recent call last)" in err
    assert "UserError: --max_steps -5" in err
    assert err.strip().splitlines()[-1].startswith("error: --max_steps -5")


def test_help_is_still_complete(capsys):
    with pytest.raises(SystemExit) as exit_:
        sft_delta.make_parser().parse_args_and_config(["--help"])
    assert exit_.value.code == 0
    assert "--delta_mode" in capsys.readouterr().out


def test_recipe_debug_value_stays_transformers_debug_option():
    """`--debug underflow_overflow` is TrainingArguments.debug; only a bare `--debug` is ours."""
    from delta_trl.errors import debug_requested, strip_debug_flag

    assert strip_debug_flag(["--debug", "underflow_overflow", "--x", "1"]) == [
        "--debug",
        "underflow_overflow",
        "--x",
        "1",
    ]
    assert strip_debug_flag(["--x", "1", "--debug"]) == ["--x", "1"]
    assert strip_debug_flag(["--debug", "--x", "1"]) == ["--x", "1"]
    assert not debug_requested(["--debug", "underflow_overflow"])


def test_user_errors_converts_input_errors_only():
    with pytest.raises(UserError, match=r"^--dataset x: bad value here$"), user_errors("--dataset x"):
        raise ValueError("bad value\n   here")
    with pytest.raises(UserError, match="No such file"), user_errors():
        open("/nonexistent/file/for/sure")
    with pytest.raises(TypeError), user_errors():  # a bug keeps its type and its traceback
        raise TypeError("not a user error")


def test_run_cli_leaves_bugs_alone(capsys):
    def main(argv):
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        run_cli(main, [])


# ---- Hub failures: one line, after the local output is complete ----------------------------------------------------


def _failing_hub(monkeypatch, calls: list) -> None:
    def create_repo(self, repo_id, **kwargs):
        calls.append(repo_id)
        raise ConnectionError("Failed to establish a new connection: [Errno 101] Network is unreachable")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kwargs: pytest.fail("upload after a failed create"))


def test_merge_push_failure_is_one_line_after_the_merge(tmp_path, capfd, monkeypatch):
    for i in range(2):
        _save_adapter(tmp_path / f"t{i}", i)
        config = json.loads((tmp_path / f"t{i}" / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = "org/tiny-llama"
        (tmp_path / f"t{i}" / "adapter_config.json").write_text(json.dumps(config))
    calls = []
    _failing_hub(monkeypatch, calls)
    capfd.readouterr()
    code = cli.main(["merge", str(tmp_path / "t0"), str(tmp_path / "t1"), "-o", str(tmp_path / "m"), "--push-to-hub", "me/m"])  # fmt: skip
    out, err = capfd.readouterr()
    assert code == 2
    assert calls == ["me/m"]
    [line] = err.strip().splitlines()
    assert line.startswith(f"error: {tmp_path / 'm'} is complete, but uploading it to the Hub repo 'me/m' failed")
    assert "ConnectionError: Failed to establish a new connection" in line
    assert "retry with: python -c" in line
    assert (tmp_path / "m" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "m" / "merge_report.json").is_file()


def test_curvature_push_failure_is_one_line_after_the_cache(workspace, tmp_path, capfd, monkeypatch):
    from delta_trl.curvature.cache import load_curvature

    calls = []
    _failing_hub(monkeypatch, calls)
    out_dir = tmp_path / "curv"
    capfd.readouterr()
    code = cli.main(
        ["curvature", "--model", str(workspace / "tiny"), "--dataset", str(workspace / "texts.jsonl"),
         "--target-modules", "q_proj", "--max-length", "8", "-o", str(out_dir), "--push-to-hub", "me/curv"]
    )  # fmt: skip
    out, err = capfd.readouterr()
    assert code == 2
    assert calls == ["me/curv"]
    assert err.strip().splitlines()[-1].startswith(f"error: {out_dir} is complete, but uploading it to the Hub repo")
    assert "error:" not in "\n".join(err.strip().splitlines()[:-1])
    assert load_curvature(out_dir).estimator == "ekfac"
