"""Two CPU processes (DDP over gloo) take the same optimizer step as one process with the whole batch."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file
from torch.testing import assert_close


ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.distributed
def test_ddp_two_processes_equals_one_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    worker = str(ROOT / "tests" / "ddp_worker.py")
    subprocess.run([sys.executable, worker, str(tmp_path / "single" / "w.safetensors"), "4"], check=True, env=env)
    # accelerate launches multi-CPU jobs through MPI only; torchrun gives DDP over gloo on one machine
    with socket.socket() as probe:  # a free port: other jobs on a shared machine may hold the default one
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    subprocess.run([*launch, worker, str(tmp_path / "ddp" / "w.safetensors"), "2"], check=True, env=env)
    single, ddp = load_file(tmp_path / "single" / "w.safetensors"), load_file(tmp_path / "ddp" / "w.safetensors")
    assert single.keys() == ddp.keys()
    assert any("delta_teacher" in k and single[k].abs().max() > 0 for k in single if ".lora_B." in k)
    for key in single:
        assert_close(ddp[key], single[key], rtol=1e-5, atol=1e-6)
