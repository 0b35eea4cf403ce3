"""Two CPU processes (DDP over gloo) take the same optimizer step as one process with the whole batch, in every mode
of the three trainers, and the two ranks end with the same weights."""

import os
import sys
from pathlib import Path

import pytest
from conftest import TORCHRUN_TWO_PROCESSES, run_worker
from ddp_worker import MODES
from safetensors.torch import load_file
from torch.testing import assert_close


ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.distributed
@pytest.mark.parametrize("kind", ["seq2seq", "sft", "dpo"])
def test_ddp_two_processes_equal_one_process_in_every_mode(kind, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    worker = str(ROOT / "tests" / "ddp_worker.py")
    reference = tmp_path / "reference.txt"
    reference.write_text("\n".join(f"What is {i} + {i % 3}? {i + i % 3}." for i in range(12)))
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    run_worker([sys.executable, worker, kind, str(single), "4", str(reference)], env)
    (ddp / "curvature").parent.mkdir(parents=True)
    os.symlink(single / "curvature", ddp / "curvature")  # one cache: estimation under DDP is tested elsewhere
    # accelerate launches multi-CPU jobs through MPI only; torchrun gives DDP over gloo on one machine
    run_worker([*TORCHRUN_TWO_PROCESSES, worker, kind, str(ddp), "2", str(reference)], env)
    for mode in MODES:
        expected = load_file(single / mode / "rank0.safetensors")
        initial_b_is_zero = [k for k in expected if ".lora_B." in k]
        assert any(expected[k].abs().max() > 0 for k in initial_b_is_zero), f"{mode}: nothing was trained"
        if mode in ("delta", "kd_only"):
            assert any(expected[k].abs().max() > 0 for k in initial_b_is_zero if "delta_teacher" in k), mode
        for rank in (0, 1):
            got = load_file(ddp / mode / f"rank{rank}.safetensors")
            assert got.keys() == expected.keys()
            for key in expected:
                assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6, msg=f"{mode}, rank {rank}: {key}")
