"""The on-disk curvature cache: estimate θ0's factors once, then reuse them for every task and run (docs/METHOD.md §4).

A cache is a folder with two files::

    curvature.safetensors   the tensors, keyed ``{module}.{A,G}`` (K-FAC) or ``{module}.{U_A,lambda_A,U_G,lambda_G,D}``
    curvature.json          format version, estimator, base model identity (name and revision for display, and
                            ``base_model_sha256``: :func:`delta_trl.core.fingerprint.base_model_fingerprint` of the whole
                            θ0), target modules and shapes, reference-data fingerprint, sample and token counts,
                            max_length, dtype, delta_trl version, and the tensor file's size and sha256

It is written atomically (temporary sibling folder + ``os.replace``) and checked on every load: a truncated or altered
tensor file, another format version, another model or other target modules raise ``ValueError`` naming the mismatch.
:func:`load_or_estimate_curvature` holds a ``filelock`` while it estimates, so independent runs sharing a cache folder
estimate it once.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from filelock import Timeout
from huggingface_hub import HfApi
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from delta_trl._utils import REPO_ID, atomic_output_dir, check_output_dir, lock_for, sha256_file, write_json
from delta_trl.core.fingerprint import FINGERPRINT_KEY, base_model_fingerprint
from delta_trl.curvature.factors import (
    ESTIMATORS,
    TENSOR_NAMES,
    CurvatureFactors,
    LayerCurvature,
    check_finite,
    resolve_target_modules,
)


logger = logging.getLogger(__name__)

# 2: the base model is identified by the sha256 of all its weights (1 hashed the target modules only).
FORMAT_VERSION = 2
TENSOR_FILE = "curvature.safetensors"
METADATA_FILE = "curvature.json"


def save_curvature(factors: CurvatureFactors, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``factors`` to the folder ``path`` atomically and return it.

    Every tensor is checked to be finite before anything is written; the folder appears complete or not at all.

    Raises:
        ValueError: ``path`` exists and ``overwrite`` is False, or a non-finite factor.
    """
    from delta_trl import __version__

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
        why = " (it identifies the base model by its target modules only)" if version == 1 else ""
        raise ValueError(
            f"{str(meta_path)!r} has curvature format version {version!r}{why}; this delta_trl reads version "
            f"{FORMAT_VERSION}. Re-estimate the cache (`delta-trl curvature --overwrite`)."
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
        model: the base model (or a ``PeftModel`` on it) the factors will be used with. Its whole θ0 (every weight
            and buffer, :func:`~delta_trl.core.fingerprint.base_model_fingerprint`) must hash to the recorded
            ``base_model_sha256``.
        target_modules: the modules the factors must cover (see
            :func:`delta_trl.curvature.factors.resolve_target_modules`; with a model and ``None``, its LoRA layers, if any).
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
        recorded = metadata["base_model"].get(FINGERPRINT_KEY)
        actual = base_model_fingerprint(model)
        if actual != recorded:
            raise ValueError(
                f"The curvature cache {str(path)!r} was estimated on another model: the sha256 of all θ0 weights is "
                f"{actual[:12]}… here but {str(recorded)[:12]}… in the cache (base model "
                f"{metadata['base_model'].get('name_or_path')!r}). Another checkpoint, revision, weight dtype or any "
                "changed layer needs its own cache."
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
    Otherwise the factors are estimated (:func:`delta_trl.curvature.estimation.estimate_curvature`); with several
    processes (an ``accelerate.Accelerator`` or an initialised ``torch.distributed``) every process must call this
    function: the reference samples are split across processes and the sums all-reduced, the main process writes the
    cache, and everyone waits for it before returning.

    Independent runs sharing ``path`` estimate it once: the estimating process (rank 0 of a job) holds a file lock
    (``.<name>.lock`` beside ``path``) from its decision to estimate until the cache is written; a run arriving
    meanwhile waits for the lock, then loads that cache (see :func:`_decide_cache_action`).

    Args:
        model: the model to be trained (a ``PeftModel``: its LoRA layers are the targets unless ``target_modules``).
        path: cache folder (or Hub repo id to read from).
        reference: a ``datasets.Dataset`` or list of texts, needed only when there is no cache.
        tokenizer: the model's tokenizer, needed with ``reference``.
        target_modules, text_column, num_samples, max_length, batch_size, estimator, dtype, seed: see
            :func:`~delta_trl.curvature.estimation.estimate_curvature`.
        accelerator: an ``accelerate.Accelerator``, if any (only its process layout is used).

    Raises:
        ValueError: no cache and no ``reference``/``tokenizer``, or any check of :func:`load_curvature`.
    """
    from delta_trl.curvature.estimation import estimate_curvature

    # DDP / DeepSpeed wrappers prefix module names: hash, resolve and hook the model itself
    unwrapped = accelerator.unwrap_model(model) if accelerator is not None else getattr(model, "module", model)
    action, lock = _decide_cache_action(path, reference, tokenizer)
    if action == _LOAD:
        return load_curvature(path, model=unwrapped, target_modules=target_modules)
    try:
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
        if lock is not None:  # the process holding the lock writes: the only one, or the main one
            save_curvature(factors, path)
            logger.info("Curvature cache written to %s", path)
    finally:
        if lock is not None:
            lock.release()
    if accelerator is not None:
        accelerator.wait_for_everyone()
    elif _world_size() > 1:
        torch.distributed.barrier()
    return factors


LOCK_POLL_SECONDS = 10.0
_LOAD, _ESTIMATE, _WAIT, _ERROR = "load", "estimate", "wait", "error"


def _world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def _cache_action(path: str | os.PathLike, reference: Any, tokenizer: Any, lock: list, timeout: float) -> str:
    """What the deciding process must do about the cache at ``path``: ``load`` it, ``estimate`` it (with the lock,
    put in ``lock``, held) or ``wait`` (another process held the lock for ``timeout`` seconds; ``-1`` waits forever).
    """
    local = Path(path)
    if local.is_dir() or (reference is None and not local.exists() and REPO_ID.match(str(path))):
        return _LOAD
    if reference is None or tokenizer is None:
        raise ValueError(
            f"There is no curvature cache at {str(path)!r}: pass `reference` texts and a `tokenizer` to estimate one, "
            "or precompute it with `delta-trl curvature --output PATH`."
        )
    check_output_dir(path, overwrite=False)  # a file at `path`: fail before the estimation, not after
    if not lock:
        lock.append(lock_for(local))
    try:
        lock[0].acquire(timeout=timeout)
    except Timeout:
        return _WAIT
    if local.is_dir():  # written by the process that held the lock before us
        lock[0].release()
        return _LOAD
    return _ESTIMATE


def _decide_cache_action(path: str | os.PathLike, reference: Any, tokenizer: Any) -> tuple[str, Any]:
    """``(action, lock)``: ``load`` the cache, or ``estimate`` it; the returned lock (held) is not ``None`` in the one
    process that must write the cache.

    One process: it takes the cache's file lock, waiting while another run holds it (that run is estimating; its cache
    is then loaded). Several processes of one job (``torch.distributed``): rank 0 alone takes the lock and decides for
    every rank, broadcasting its decision (errors included) every ``LOCK_POLL_SECONDS`` while it waits, so the other
    ranks never wait on the lock, never meet a collective timeout, and all join the estimation's collectives together.
    """
    lock: list = []
    if _world_size() == 1:
        action = _cache_action(path, reference, tokenizer, lock, timeout=0)
        if action == _WAIT:
            logger.info("Another process is estimating the curvature cache %s; waiting for it to finish.", path)
            action = _cache_action(path, reference, tokenizer, lock, timeout=-1)
        return action, lock[0] if action == _ESTIMATE else None
    deciding = torch.distributed.get_rank() == 0
    while True:
        message: list[Any] = [None]
        error = None
        if deciding:
            try:
                message = [(_cache_action(path, reference, tokenizer, lock, timeout=LOCK_POLL_SECONDS), None)]
            except Exception as err:  # every rank must hear about it, or they would wait forever
                message, error = [(_ERROR, f"{type(err).__name__}: {err}")], err
        torch.distributed.broadcast_object_list(message, src=0)
        action, detail = message[0]
        if error is not None:
            raise error
        if action == _ERROR:
            kind, _, text = detail.partition(": ")
            raise (ValueError if kind == "ValueError" else RuntimeError)(f"On rank 0: {text}")
        if action != _WAIT:
            return action, lock[0] if deciding and action == _ESTIMATE else None
