"""The identity of a base model θ0: a sha256 over the *content* of every parameter and buffer, never its name.

Task vectors only add up on the θ0 they were trained on, and θ0's curvature is a function of all its weights, so
both merging (:mod:`delta_trl.merging.merge`) and the curvature cache (:mod:`delta_trl.curvature.cache`) identify the base
model by :func:`base_model_fingerprint`. A name such as ``base_model_name_or_path`` is for display only: one
checkpoint can be called by a Hub id or a local path, and two revisions share one name.

What is hashed, in order of the canonical names: for each tensor its name, dtype, shape and byte count, then its raw
bytes. LoRA (and other PEFT) weights are excluded and PEFT's wrappers are looked through (``….q_proj.base_layer.weight``
is hashed as ``….q_proj.weight``), so a model hashes the same before and after ``get_peft_model`` and whatever
adapters it carries; tied weights count once. Moving the model to another device keeps the hash; casting it to another
dtype changes it (it computes other numbers).
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Iterator

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper


FINGERPRINT_KEY = "base_model_sha256"
"""The key under which ``delta_trl.json`` (and ``curvature.json``'s ``base_model``) records the fingerprint."""
DTYPE_KEY = "base_model_dtype"
"""The key under which ``delta_trl.json`` records :func:`base_model_dtype` (the dtype to load the base model in)."""

# root module -> (stamp of its tensors, fingerprint); weak, so a cached model can still be freed
_CACHE: weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple, str]] = weakref.WeakKeyDictionary()


def _root(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under PEFT, DDP / DataParallel and ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, PeftModel):
            model = model.get_base_model()
        elif isinstance(model, BaseTuner):
            model = model.model
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel | torch.nn.DataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, torch.nn.Module):
            model = model._orig_mod
        else:
            return model


def base_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter and buffer of the base model under ``model``, with its canonical name (PEFT-independent).

    PEFT adapter weights (a tuner layer's ``adapter_layer_names``, a wrapper's trainable copies) are skipped, the
    ``base_layer`` / ``original_module`` level of PEFT's wrappers is dropped from the names, and a tensor reachable
    under two names (tied weights) is yielded once, under the first name in registration order.
    """
    seen: set[int] = set()

    def walk(module: torch.nn.Module, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
        tensors = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        for name, tensor in tensors:
            if tensor is not None and id(tensor) not in seen:
                seen.add(id(tensor))
                yield prefix + name, tensor
        tuner = isinstance(module, BaseTunerLayer)
        wrapper = isinstance(module, AuxiliaryTrainingWrapper)
        for name, child in module.named_children():
            if (tuner and name in module.adapter_layer_names) or (wrapper and name != "original_module"):
                continue  # adapter weights, or a wrapper's trainable copies
            see_through = (tuner and name == "base_layer") or (wrapper and name == "original_module")
            yield from walk(child, prefix if see_through else f"{prefix}{name}.")

    yield from walk(_root(model), "")


def _stamp(tensors: list[tuple[str, torch.Tensor]]) -> tuple:
    """Changes whenever a tensor is replaced or modified in place through autograd-visible ops (``_version``).

    In-place edits through ``.data`` bypass the version counter; call with ``use_cache=False`` after those.
    """
    return tuple((name, t.data_ptr(), t._version, t.dtype, tuple(t.shape), str(t.device)) for name, t in tensors)


def base_model_fingerprint(model: torch.nn.Module, *, use_cache: bool = True) -> str:
    """Hex sha256 of the base model's content: every parameter and buffer (name, dtype, shape, bytes), no adapters.

    ``model`` may be a transformers model, a ``PeftModel`` (its LoRA weights are excluded, see :func:`base_tensors`)
    or a DDP-wrapped one. The result is cached on the model object and reused while no tensor has been replaced or
    modified in place (checked on every call, at the cost of a pass over the tensors' metadata); ``use_cache=False``
    recomputes.

    Raises:
        ValueError: a tensor is on the ``meta`` device (an offloaded or not yet materialised model), so its values
            are unknown.
    """
    root = _root(model)
    tensors = sorted(base_tensors(root), key=lambda item: item[0])
    stamp = _stamp(tensors)
    cached = _CACHE.get(root)
    if use_cache and cached is not None and cached[0] == stamp:
        return cached[1]
    digest = hashlib.sha256()
    for name, tensor in tensors:
        if tensor.device.type == "meta":
            raise ValueError(
                f"{name} is on the meta device (offloaded or not materialised): load the whole model in memory "
                "to fingerprint it."
            )
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        digest.update(
            f"{name}\0{str(tensor.dtype).removeprefix('torch.')}\0{tuple(tensor.shape)}\0{data.numel()}\0".encode()
        )
        digest.update(data.numpy())
    fingerprint = digest.hexdigest()
    _CACHE[root] = (stamp, fingerprint)
    return fingerprint


def base_model_dtype(model: torch.nn.Module) -> str:
    """The floating-point dtype holding most of the base model's parameter elements, e.g. ``"float32"``.

    Recorded beside the fingerprint so that the base model can be reloaded in the dtype it was hashed in (the hash of
    a bf16 checkpoint loaded in fp32 is that of the fp32 weights). ``"float32"`` if there is no floating parameter.
    """
    counts: dict[torch.dtype, int] = {}
    for _, tensor in base_tensors(model):
        if isinstance(tensor, torch.nn.Parameter) and tensor.is_floating_point():
            counts[tensor.dtype] = counts.get(tensor.dtype, 0) + tensor.numel()
    dtype = max(counts, key=counts.__getitem__) if counts else torch.float32
    return str(dtype).removeprefix("torch.")
