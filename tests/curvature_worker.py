"""Worker for test_curvature_cache.py: load_or_estimate_curvature on a tiny Llama, in one or several processes."""

import os
import sys
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model


sys.path.insert(0, str(Path(__file__).parent))
from conftest import make_llama, make_tokenizer  # noqa: E402

from delta_trl.curvature.cache import load_curvature, load_or_estimate_curvature  # noqa: E402


TEXTS = [f"What is {i} + {i % 3}? {i + i % 3}." + " please" * (i % 4) for i in range(11)]


def main(output: Path) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        torch.distributed.init_process_group("gloo")
    model = get_peft_model(make_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    factors = load_or_estimate_curvature(
        model, path=output, reference=TEXTS, tokenizer=make_tokenizer(300), max_length=16, batch_size=2
    )
    # every rank holds the all-reduced factors, identical to what the main process wrote
    stored = load_curvature(output, model=model)
    for name, layer in factors.layers.items():
        for key, tensor in layer.tensors.items():
            if not torch.equal(stored.layers[name].tensors[key], tensor):
                raise RuntimeError(f"rank {os.environ.get('RANK')}: {name}.{key} differs from the written cache")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
