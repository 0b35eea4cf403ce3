"""The on-disk curvature cache: estimate θ0's factors once, then reuse them for every task and run (METHOD.md §4).

A cache is a folder with two files::

    curvature.safetensors   the tensors, keyed ``{module}.{A,G}`` (K-FAC) or ``{module}.{U_A,lambda_A,U_G,lambda_G,D}``
    curvature.json          format version, estimator, base model identity (name, revision, sha256 of the target
                            modules' θ0 weights), target modules and shapes, reference-data fingerprint, sample and
                            token counts, max_length, dtype, delta_trl version, and the tensor file's size and sha256

It is written atomically (temporary sibling folder + ``os.replace``) and checked on every load: a truncated or altered
tensor file, another format version, another model or other target modules raise ``ValueError`` naming the mismatch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import HfApi
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ._utils import atomic_output_dir, check_output_dir, sha256_file, write_json
from .adapter_io import REPO_ID
from .curvature import (
    ESTIMATORS,
    TENSOR_NAMES,
    CurvatureFactors,
    LayerCurvature,
    base_model_of,
    check_finite,
    linear_base_layer,
    resolve_target_modules,
)


logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
TENSOR_FILE = "curvature.safetensors"
METADATA_FILE = "curvature.json"


def weights_sha256(model: torch.nn.Module, module_names: Sequence[str]) -> str:
    """sha256 over the θ0 weights (and biases) of the named linear modules: name, dtype, shape and bytes.

    It identifies the base model the factors belong to: another checkpoint, revision or weight dtype hashes
    differently. LoRA weights are not included (for a LoRA layer the ``base_layer`` is hashed).
    """
    digest = hashlib.sha256()
    modules = dict(base_model_of(model).named_modules())
    missing = sorted(set(module_names) - set(modules))
    if missing:
        raise ValueError(f"The model has no modules named {missing[:5]}: these factors belong to another model.")
    for name in sorted(module_names):
        linear = linear_base_layer(modules[name], name)
        for kind, tensor in (("weight", linear.weight), ("bias", linear.bias)):
            if tensor is None:
                continue
            data = tensor.detach().to("cpu").contiguous()
            digest.update(f"{name}.{kind}:{data.dtype}:{tuple(data.shape)}".encode())
            digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def save_curvature(factors: CurvatureFactors, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``factors`` to the folder ``path`` atomically and return it.

    Every tensor is checked to be finite before anything is written; the folder appears complete or not at all.

    Raises:
        ValueError: ``path`` exists and ``overwrite`` is False, or a non-finite factor.
    """
    from . import __version__

    tensors: dict[str, torch.Tensor] = {}
    for name, layer in factors.layers.items():
        check_finite({f"{name}.{k}": t for k, t in layer.tensors.items()}, "curvature factor")
        tensors.update({f"{name}.{k}": t.detach().to("cpu").contiguous() for k, t in layer.tensors.items()})
    with atomic_output_dir(path, overwrite=overwrite) as tmp:
        save_file(tensors, tmp / TENSOR_FILE)
        metadata = {
            "format_version": FORMAT_VERSION,
            **factors.metadata,
            "estimator": factors.estimator,
            "target_modules": factors.module_names,
            "shapes": {name: list(layer.shape) for name, layer in sorted(factors.layers.items())},
            "delta_trl_version": __version__,
            "tensor_file": {
                "name": TENSOR_FILE,
                "bytes": (tmp / TENSOR_FILE).stat().st_size,
                "sha256": sha256_file(tmp / TENSOR_FILE),
            },
            "size_report": factors.size_report(),
        }
        write_json(tmp / METADATA_FILE, metadata)
    return Path(path)


def _resolve_path(source: str | os.PathLike) -> Path:
    path = Path(source)
    if path.exists() or not REPO_ID.match(str(source)):
        if not path.is_dir():
            raise FileNotFoundError(f"No curvature cache folder at {str(path)!r}.")
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(source), allow_patterns=[TENSOR_FILE, METADATA_FILE]))
    except Exception as err:  # offline, unknown repo, no access: all mean "no cache here"
        raise FileNotFoundError(
            f"No curvature cache folder at {str(source)!r}, and fetching it as a Hub repo failed ({err})."
        ) from err


def read_curvature_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The validated ``curvature.json`` of a cache folder (no tensor is read)."""
    folder = Path(path)
    meta_path = folder / METADATA_FILE
    if not meta_path.is_file():
        raise ValueError(f"{str(folder)!r} has no {METADATA_FILE}: it is not a delta_trl curvature cache.")
    try:
        metadata = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{str(meta_path)!r} is not valid JSON ({err}): the cache is corrupt.") from err
    if not isinstance(metadata, dict) or metadata.get("format_version") != FORMAT_VERSION:
        version = metadata.get("format_version") if isinstance(metadata, dict) else None
        raise ValueError(
            f"{str(meta_path)!r} has curvature format version {version!r}; this delta_trl reads version "
            f"{FORMAT_VERSION}. Re-estimate the cache (`delta-trl curvature`)."
        )
    for key in ("estimator", "target_modules", "shapes", "tensor_file", "base_model"):
        if key not in metadata:
            raise ValueError(f"{str(meta_path)!r} lacks the field {key!r}: the cache is corrupt.")
    if metadata["estimator"] not in ESTIMATORS:
        raise ValueError(f"{str(meta_path)!r} names an unknown estimator {metadata['estimator']!r}.")
    return metadata


def load_curvature(
    path: str | os.PathLike,
    model: torch.nn.Module | None = None,
    target_modules: LoraConfig | Sequence[str] | str | None = None,
) -> CurvatureFactors:
    """Load and verify a curvature cache (a local folder or a Hub repo id), optionally against a model.

    Args:
        path: the cache folder, or a Hub model repo id (``owner/name``) fetched with ``snapshot_download``.
        model: the base model (or a ``PeftModel`` on it) the factors will be used with. Its target modules' θ0
            weights must hash to the recorded ``weights_sha256``.
        target_modules: the modules the factors must cover (see
            :func:`delta_trl.curvature.resolve_target_modules`; with a model and ``None``, its LoRA layers, if any).
            The returned factors are restricted to them; without a model, the names are matched exactly or by
            suffix against the cache's modules.

    Raises:
        ValueError: a corrupt or truncated cache (size, checksum, safetensors parse, missing or misshapen tensors,
            non-finite values), another format version, another model, or target modules the cache does not cover.
    """
    folder = _resolve_path(path)
    metadata = read_curvature_metadata(folder)
    tensor_path = folder / TENSOR_FILE
    expected = metadata["tensor_file"]
    if not tensor_path.is_file():
        raise ValueError(f"{str(tensor_path)!r} is missing: the cache is incomplete.")
    if tensor_path.stat().st_size != expected.get("bytes") or sha256_file(tensor_path) != expected.get("sha256"):
        raise ValueError(
            f"{str(tensor_path)!r} does not match the size/sha256 recorded in {METADATA_FILE}: the file is truncated "
            "or altered. Re-estimate the cache."
        )
    try:
        tensors = load_file(tensor_path)
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{str(tensor_path)!r} cannot be parsed as safetensors ({err}).") from err
    estimator, names = metadata["estimator"], metadata["target_modules"]
    keys = {f"{name}.{k}" for name in names for k in TENSOR_NAMES[estimator]}
    if set(tensors) != keys:
        raise ValueError(f"{str(tensor_path)!r} holds other tensors than its metadata lists: the cache is corrupt.")
    layers = {
        name: LayerCurvature(estimator, {k: tensors[f"{name}.{k}"] for k in TENSOR_NAMES[estimator]}) for name in names
    }
    for name, layer in layers.items():
        if list(layer.shape) != list(metadata["shapes"][name]):
            raise ValueError(f"{name}: stored tensors are {layer.shape}, metadata says {metadata['shapes'][name]}.")
        check_finite({f"{name}.{k}": t for k, t in layer.tensors.items()}, "cached curvature factor")
    factors = CurvatureFactors(layers=layers, metadata=metadata)
    if model is not None:
        recorded = metadata["base_model"].get("weights_sha256")
        try:
            actual = weights_sha256(model, names)
        except ValueError as err:
            raise ValueError(f"The curvature cache {str(path)!r} does not fit this model: {err}") from err
        if actual != recorded:
            raise ValueError(
                f"The curvature cache {str(path)!r} was estimated on another model: the sha256 of the target modules' "
                f"θ0 weights is {actual[:12]}… here but {str(recorded)[:12]}… in the cache (base model "
                f"{metadata['base_model'].get('name_or_path')!r}). Another checkpoint, revision or weight dtype needs "
                "its own cache."
            )
        if target_modules is not None or any(isinstance(m, LoraLayer) for m in model.modules()):
            factors = _select(factors, resolve_target_modules(model, target_modules), path)
    elif target_modules is not None:
        wanted = target_modules.target_modules if isinstance(target_modules, LoraConfig) else target_modules
        wanted = [wanted] if isinstance(wanted, str) else list(wanted)
        matched = [n for n in names if any(n == w or n.endswith("." + w) for w in wanted)]
        unmatched = [w for w in wanted if not any(n == w or n.endswith("." + w) for n in names)]
        if unmatched:
            raise ValueError(
                f"The curvature cache {str(path)!r} has no factors for the target modules {unmatched} (it covers "
                f"{sorted({n.rsplit('.', 1)[-1] for n in names})})."
            )
        factors = factors.select(matched)
    return factors


def _select(factors: CurvatureFactors, names: Sequence[str], path: str | os.PathLike) -> CurvatureFactors:
    try:
        return factors.select(names)
    except ValueError as err:
        raise ValueError(f"The curvature cache {str(path)!r} has other target modules: {err}") from err


def push_curvature_to_hub(
    path: str | os.PathLike,
    repo_id: str,
    *,
    api: HfApi | None = None,
    private: bool = False,
    commit_message: str = "Upload delta_trl curvature cache",
) -> str:
    """Verify a cache folder and upload its two files to the Hub model repo ``repo_id``; returns the commit URL."""
    folder = Path(path)
    load_curvature(folder)  # never publish a corrupt cache
    api = api or HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    commit = api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        repo_type="model",
        allow_patterns=[TENSOR_FILE, METADATA_FILE],
        commit_message=commit_message,
    )
    return str(commit)


def load_or_estimate_curvature(
    model: torch.nn.Module,
    *,
    path: str | os.PathLike,
    reference: Any = None,
    tokenizer: Any = None,
    target_modules: LoraConfig | Sequence[str] | str | None = None,
    text_column: str | None = None,
    num_samples: int | None = None,
    max_length: int = 512,
    batch_size: int = 8,
    estimator: str = "ekfac",
    dtype: torch.dtype | str = torch.float32,
    seed: int = 0,
    accelerator: Any = None,
) -> CurvatureFactors:
    """θ0's curvature factors for ``model``: from the cache at ``path``, or estimated on ``reference`` and cached.

    The cache, if present (a folder or a Hub repo id), is validated against the model (:func:`load_curvature`).
    Otherwise the factors are estimated (:func:`delta_trl.curvature_estimation.estimate_curvature`); with several
    processes (an ``accelerate.Accelerator`` or an initialised ``torch.distributed``) every process must call this
    function: the reference samples are split across processes and the sums all-reduced, the main process writes the
    cache, and everyone waits for it before returning.

    Args:
        model: the model to be trained (a ``PeftModel``: its LoRA layers are the targets unless ``target_modules``).
        path: cache folder (or Hub repo id to read from).
        reference: a ``datasets.Dataset`` or list of texts, needed only when there is no cache.
        tokenizer: the model's tokenizer, needed with ``reference``.
        target_modules, text_column, num_samples, max_length, batch_size, estimator, dtype, seed: see
            :func:`~delta_trl.curvature_estimation.estimate_curvature`.
        accelerator: an ``accelerate.Accelerator``, if any (only its process layout is used).

    Raises:
        ValueError: no cache and no ``reference``/``tokenizer``, or any check of :func:`load_curvature`.
    """
    from .curvature_estimation import estimate_curvature

    # DDP / DeepSpeed wrappers prefix module names: hash, resolve and hook the model itself
    unwrapped = accelerator.unwrap_model(model) if accelerator is not None else getattr(model, "module", model)
    if Path(path).is_dir() or (reference is None and not Path(path).exists() and REPO_ID.match(str(path))):
        return load_curvature(path, model=unwrapped, target_modules=target_modules)
    if reference is None or tokenizer is None:
        raise ValueError(
            f"There is no curvature cache at {str(path)!r}: pass `reference` texts and a `tokenizer` to estimate one, "
            "or precompute it with `delta-trl curvature --output PATH`."
        )
    check_output_dir(path, overwrite=False)  # fail on every process before the estimation, not after
    factors = estimate_curvature(
        unwrapped,
        tokenizer,
        reference,
        target_modules=target_modules,
        text_column=text_column,
        num_samples=num_samples,
        max_length=max_length,
        batch_size=batch_size,
        estimator=estimator,
        dtype=dtype,
        seed=seed,
    )
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    is_main = (
        accelerator.is_main_process
        if accelerator is not None
        else (not distributed or torch.distributed.get_rank() == 0)
    )
    if is_main:
        save_curvature(factors, path)
        logger.info("Curvature cache written to %s", path)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    elif distributed:
        torch.distributed.barrier()
    return factors


TEXT_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".txt": "text"}


def load_text_dataset(source: str, config: str | None = None, split: str = "train") -> Any:
    """A reference text set from a json/jsonl/csv/txt file or a Hub dataset id (``datasets.load_dataset``)."""
    from datasets import load_dataset

    path = Path(source)
    if path.is_file():
        if path.suffix not in TEXT_FILE_BUILDERS:
            raise ValueError(f"{source!r}: unsupported file type {path.suffix!r}; use {sorted(TEXT_FILE_BUILDERS)}.")
        return load_dataset(TEXT_FILE_BUILDERS[path.suffix], data_files=str(path), split="train")
    if path.exists():
        raise ValueError(f"{source!r} is a folder; pass a .jsonl/.json/.csv/.txt file or a Hub dataset id.")
    return load_dataset(source, config, split=split)
