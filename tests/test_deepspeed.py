"""DeepSpeed: ZeRO-2 trains DELTA; ZeRO-3 (no forward-mode AD) is refused when the trainer is built."""

import json
import os
import socket
import sys
from pathlib import Path

import pytest
from conftest import run_worker


pytest.importorskip("deepspeed", reason="DeepSpeed is an optional extra (scripts/setup.sh installs it)")
ROOT = Path(__file__).resolve().parents[1]


def _run(stage: int, tmp_path) -> dict:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "DS_BUILD_OPS": "0"}  # fmt: skip
    done = run_worker([sys.executable, str(ROOT / "tests" / "deepspeed_worker.py"), str(stage), str(tmp_path)], env)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.distributed  # a DeepSpeed process with its own rendezvous
def test_zero3_is_refused_with_what_to_do(tmp_path):
    result = _run(3, tmp_path)
    assert "ZeRO-3" in result["refused"]
    assert "zero2.yaml" in result["refused"]


@pytest.mark.distributed
def test_zero2_trains_both_adapters(tmp_path):
    result = _run(2, tmp_path)
    assert result["steps"] == 3
    assert result["teacher_moved"] > 0
    assert result["logged"]["delta/teacher_loss"] > 0
