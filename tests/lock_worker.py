"""Worker for test_locks.py: build a shared cache (curvature or embedded model) in an independent process.

usage: lock_worker.py {curvature|embedded|ddp} SHARED_DIR WORKER_ID [N_WORKERS]

Every worker waits at a file barrier (all workers ready) so that they ask for the cache at the same moment, records
each time it does the expensive work in SHARED_DIR/work.log (the work itself sleeps 1.5 s, so the others arrive while it
runs), and writes a digest of what it got to SHARED_DIR/result-WORKER_ID.txt.
"""

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).parent))
from conftest import make_llama, make_tokenizer  # noqa: E402


TEXTS = [f"What is {i} + {i % 3}? {i + i % 3}." for i in range(6)]


def barrier(shared: Path, worker: str, count: int) -> None:
    (shared / f"ready-{worker}").touch()
    deadline = time.monotonic() + 120
    while len(list(shared.glob("ready-*"))) < count:
        if time.monotonic() > deadline:
            raise TimeoutError("the other workers never started")
        time.sleep(0.02)


def log_work(shared: Path, worker: str) -> None:
    with open(shared / "work.log", "a") as handle:
        handle.write(f"{worker}\n")
    time.sleep(1.5)


def curvature(shared: Path, worker: str) -> str:
    from peft import LoraConfig, get_peft_model

    from delta_trl.curvature import cache as curvature_cache
    from delta_trl.curvature import estimation as curvature_estimation

    real = curvature_estimation.estimate_curvature

    def counted(*args, **kwargs):
        log_work(shared, worker)
        return real(*args, **kwargs)

    curvature_estimation.estimate_curvature = counted
    curvature_cache.LOCK_POLL_SECONDS = 0.5
    model = get_peft_model(make_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    factors = curvature_cache.load_or_estimate_curvature(
        model, path=shared / "curv", reference=TEXTS, tokenizer=make_tokenizer(300), max_length=8
    )
    digest = hashlib.sha256()
    for name in factors.module_names:
        for key, tensor in sorted(factors.layers[name].tensors.items()):
            digest.update(f"{name}.{key}".encode() + tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()


def embedded(shared: Path, worker: str) -> str:
    from delta_trl import embedded as module

    def fake_convert(gguf: Path, folder: Path) -> None:
        log_work(shared, worker)
        (folder / "model.safetensors").write_bytes(b"weights of " + gguf.name.encode())
        files = module._weight_files(folder)
        manifest = {
            "version": module.MANIFEST_VERSION,
            "sha256": {f.name: module.sha256_file(f) for f in files},
            "sizes": {f.name: f.stat().st_size for f in files},
        }
        (folder / module.MANIFEST).write_text(json.dumps(manifest))

    module._gguf_path = lambda: Path("/nowhere/fake.gguf")
    module._convert = fake_convert
    folder = module.prepare_embedded_model(shared / "cache")
    return f"{folder}:{module.sha256_file(folder / 'model.safetensors')}"


def main() -> None:
    mode, shared, worker = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    count = int(sys.argv[4]) if len(sys.argv) > 4 else 2
    if mode == "ddp":  # one job of WORLD_SIZE ranks; the test holds the cache lock while it starts
        torch.distributed.init_process_group("gloo")
        worker = f"{worker}-rank{os.environ['RANK']}"
        (shared / f"started-{worker}").touch()
        result = curvature(shared, worker)
        torch.distributed.destroy_process_group()
    else:
        barrier(shared, worker, count)
        result = curvature(shared, worker) if mode == "curvature" else embedded(shared, worker)
    (shared / f"result-{worker}.txt").write_text(result)


if __name__ == "__main__":
    main()
