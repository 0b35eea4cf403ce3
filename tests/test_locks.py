"""Process-safe caches and umask-honouring outputs: independent processes sharing a cache do the work once."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import make_llama, make_tokenizer
from peft import LoraConfig, get_peft_model

from delta_trl import _utils
from delta_trl._utils import atomic_output_dir, atomic_write, current_umask, lock_for, replace_dir, write_json
from delta_trl.curvature.cache import load_curvature, save_curvature
from delta_trl.curvature.estimation import estimate_curvature
from delta_trl.merging.merge import merge_adapters


ROOT = Path(__file__).resolve().parents[1]
WORKER = str(ROOT / "tests" / "lock_worker.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def run_workers(mode: str, shared: Path, count: int = 2) -> list[str]:
    """Start ``count`` independent worker processes at once; return what each got."""
    shared.mkdir(parents=True, exist_ok=True)
    procs = [
        subprocess.Popen(
            [sys.executable, WORKER, mode, str(shared), str(i), str(count)],
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for i in range(count)
    ]
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out.decode()[-4000:]
    return [(shared / f"result-{i}.txt").read_text() for i in range(count)]


def work_log(shared: Path) -> list[str]:
    path = shared / "work.log"
    return path.read_text().split() if path.exists() else []


def factors_digest(factors) -> str:
    """The digest lock_worker.py writes: every tensor's bytes, in module and key order."""
    digest = hashlib.sha256()
    for name in factors.module_names:
        for key, tensor in sorted(factors.layers[name].tensors.items()):
            digest.update(f"{name}.{key}".encode() + tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.distributed
def test_two_runs_estimate_the_curvature_once(tmp_path):
    """Without the lock both processes find no cache, both estimate (two lines in work.log), and one fails to save."""
    results = run_workers("curvature", tmp_path)
    assert len(work_log(tmp_path)) == 1
    assert results[0] == results[1] == factors_digest(load_curvature(tmp_path / "curv"))
    assert sorted(p.name for p in tmp_path.glob(".curv.*-*")) == []  # no temporary or moved-aside folder


@pytest.mark.distributed
@pytest.mark.embedded
def test_two_processes_convert_the_embedded_model_once(tmp_path):
    results = run_workers("embedded", tmp_path)
    assert len(work_log(tmp_path)) == 1
    assert results[0] == results[1]
    folder = Path(results[0].split(":")[0])
    assert folder == tmp_path / "cache" / "smollm2-135m-instruct"
    assert sorted(p.name for p in folder.iterdir()) == ["delta_trl_embedded.json", "model.safetensors"]
    assert [p.name for p in folder.parent.iterdir() if p.name.startswith(".smollm2-135m-instruct.tmp-")] == []


@pytest.mark.distributed
def test_ddp_job_waits_for_another_runs_lock_then_loads(tmp_path):
    """A 2-rank job meets a cache being estimated by another run: rank 0 polls the lock (broadcasting "wait" every
    poll, so rank 1 is never stuck in a collective), then every rank loads what the other run wrote."""
    texts = [f"What is {i} + {i % 3}? {i + i % 3}." for i in range(6)]
    model = get_peft_model(make_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    factors = estimate_curvature(model, make_tokenizer(300), texts, max_length=8, progress=False)
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29547"]
    with lock_for(tmp_path / "curv"):  # the "other run", estimating
        job = subprocess.Popen(
            [*launch, WORKER, "ddp", str(tmp_path), "job"], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 120
        while len(list(tmp_path.glob("started-*"))) < 2 and time.monotonic() < deadline and job.poll() is None:
            time.sleep(0.1)
        time.sleep(2.0)  # several 0.5 s polls
        save_curvature(factors, tmp_path / "curv")
    out, _ = job.communicate(timeout=300)
    assert job.returncode == 0, out.decode()[-4000:]
    assert work_log(tmp_path) == []  # nobody estimated
    assert {(tmp_path / f"result-job-rank{r}.txt").read_text() for r in (0, 1)} == {factors_digest(factors)}


@pytest.fixture
def restore_umask():
    old = os.umask(0o022)
    os.umask(old)
    yield
    os.umask(old)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_outputs_honour_the_umask(tmp_path, restore_umask, mask):
    """mkstemp/mkdtemp create 0600/0700; the outputs must get what open/mkdir would: 0o666/0o777 & ~umask."""
    os.umask(mask)
    assert current_umask() == mask
    file_mode, dir_mode = 0o666 & ~mask, 0o777 & ~mask
    atomic_write(tmp_path / "f.txt", lambda tmp: Path(tmp).write_text("x"))
    assert mode_of(tmp_path / "f.txt") == file_mode
    with atomic_output_dir(tmp_path / "d") as tmp:
        write_json(tmp / "a.json", {"x": 1})
    assert mode_of(tmp_path / "d") == dir_mode
    assert mode_of(tmp_path / "d" / "a.json") == file_mode

    for i in range(2):
        torch.manual_seed(i)
        config = LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
        get_peft_model(make_llama(), config).save_pretrained(tmp_path / f"t{i}")
    merged = merge_adapters([tmp_path / "t0", tmp_path / "t1"], None, tmp_path / "merged").output_dir
    assert mode_of(merged) == dir_mode
    names = ["adapter_config.json", "adapter_model.safetensors", "delta_trl.json", "merge_report.json"]
    assert {p.name: mode_of(p) for p in merged.iterdir()} == dict.fromkeys(names, file_mode)
    factors = estimate_curvature(make_llama(), make_tokenizer(300), ["the cat sleeps"], target_modules=["q_proj"])
    cache = save_curvature(factors, tmp_path / "curv")
    assert mode_of(cache) == dir_mode
    assert {mode_of(p) for p in cache.iterdir()} == {file_mode}


def test_current_umask_without_proc_sets_and_restores(restore_umask, monkeypatch):
    os.umask(0o027)
    monkeypatch.setattr(_utils.Path, "read_text", lambda self: (_ for _ in ()).throw(OSError("no /proc")))
    assert current_umask() == 0o027
    monkeypatch.undo()
    assert current_umask() == 0o027


def test_replace_dir_puts_the_old_folder_back_if_the_move_fails(tmp_path, monkeypatch):
    target, source = tmp_path / "out", tmp_path / "new"
    target.mkdir()
    (target / "old.txt").write_text("old")
    source.mkdir()
    (source / "new.txt").write_text("new")
    real = os.replace
    calls = []

    def flaky(src, dst):
        calls.append((Path(src), Path(dst)))
        if len(calls) == 2:  # the move of the new folder into place
            raise OSError("disk full")
        return real(src, dst)

    monkeypatch.setattr(_utils.os, "replace", flaky)
    with pytest.raises(OSError, match="disk full"):
        replace_dir(source, target)
    monkeypatch.undo()
    assert (target / "old.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "out"]
    replace_dir(source, target)
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert calls[0][1].parent.name.startswith(".out.old-")  # the old folder was moved aside first
