"""Reading saved LoRA adapters (local folders or hub ids) into per-module ``(A, B, scaling)`` triples.

Only what task arithmetic can merge exactly is accepted: vanilla LoRA or rsLoRA on linear layers, without DoRA or
another ``lora_variant``, LoRA biases, ``modules_to_save`` or trainable tokens. Anything else raises ``ValueError``
(unsupported → exception), because silently dropping part of an adapter would change the merged model.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftConfig
from peft.utils import load_peft_weights
from peft.utils.other import get_pattern_key

from delta_trl._utils import REPO_ID, read_delta_trl_metadata


# A hub repo id is `owner/name`; anything else that is not an existing folder is a missing local path.
_LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


@dataclass(frozen=True)
class LoraModule:
    """One target module of an adapter: ``ΔW = scaling·B·A`` with ``A`` ``(r, in)`` and ``B`` ``(out, r)``."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """``(out_features, in_features)`` of ``ΔW`` (the weight's shape unless ``fan_in_fan_out``)."""
        return (self.lora_B.shape[0], self.lora_A.shape[1])

    def delta(self) -> torch.Tensor:
        """``ΔW = s·B·A`` in float32, ``(out, in)`` layout (PEFT ``get_delta_weight`` before its fan-in transpose)."""
        return self.scaling * (self.lora_B.float() @ self.lora_A.float())


@dataclass(frozen=True)
class LoadedAdapter:
    """A saved LoRA adapter: its config, its modules keyed by PEFT state-dict prefix, and ``delta_trl.json``."""

    source: str
    path: Path
    config: LoraConfig
    modules: dict[str, LoraModule]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.modules.values())).lora_A.dtype

    def task_vector(self) -> dict[str, torch.Tensor]:
        """``τ = {module: s·B·A}`` (float32, ``(out, in)`` layout)."""
        return {name: module.delta() for name, module in self.modules.items()}


def resolve_adapter_path(source: str | os.PathLike) -> Path:
    """A local folder, or a hub repo id (``owner/name``) downloaded with ``huggingface_hub.snapshot_download``."""
    path = Path(source)
    if path.is_dir():
        return path
    text = str(source)
    if path.exists() or not REPO_ID.match(text):
        raise FileNotFoundError(
            f"Adapter folder {text!r} does not exist. Give the folder that contains adapter_config.json "
            "(the `output_dir` of training) or a hub repo id `owner/name`."
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(text, allow_patterns=["*.json", "*.safetensors", "*.bin", "README.md"]))
    except Exception as err:  # every hub failure (offline, 404, auth, bad id) means "not found" here
        raise FileNotFoundError(
            f"{text!r} is neither a local adapter folder nor a downloadable hub repo ({type(err).__name__}: {err})."
        ) from err


def _check_lora_config(config: PeftConfig, source: str) -> LoraConfig:
    """Raise unless ``config`` is a LoRA config whose update is ``s·B·A`` on linear layers only."""
    if not isinstance(config, LoraConfig):
        raise ValueError(f"{source!r} is a {type(config).__name__} adapter; only LoRA adapters can be merged.")
    # PEFT tags every LoRA variant field with `is_lora_variant` metadata (peft.tuners.lora.layer.resolve_lora_variant).
    variants = [
        f.name for f in dataclasses.fields(config) if f.metadata.get("is_lora_variant") and getattr(config, f.name)
    ]
    init_field = next(f for f in dataclasses.fields(LoraConfig) if f.name == "init_lora_weights")
    if config.init_lora_weights in init_field.metadata.get("lora_variants", ()):
        variants.append(f"init_lora_weights={config.init_lora_weights!r}")
    if variants:
        raise ValueError(
            f"{source!r} uses the LoRA variant(s) {variants} (e.g. DoRA), whose update is not s·B·A; task "
            "arithmetic needs vanilla LoRA or rsLoRA."
        )
    unsupported = {
        "modules_to_save": config.modules_to_save,
        "trainable_token_indices": config.trainable_token_indices,
        "target_parameters": config.target_parameters,
        "lora_bias": config.lora_bias or None,
        "layer_replication": config.layer_replication,
        "use_qalora": config.use_qalora or None,
    }
    if config.bias != "none":
        unsupported["bias"] = config.bias
    unsupported = {k: v for k, v in unsupported.items() if v is not None}
    if unsupported:
        raise ValueError(
            f"{source!r} trains more than LoRA factors ({unsupported}); merging would drop those weights. "
            "Merge adapters trained with plain LoRA settings only."
        )
    return config


def _module_scaling(config: LoraConfig, module_path: str, rank: int, source: str) -> float:
    """PEFT's scaling for one module: ``alpha/r`` (rsLoRA ``alpha/√r``) with ``rank_pattern``/``alpha_pattern``."""
    rank_key = get_pattern_key(config.rank_pattern.keys(), module_path)
    alpha_key = get_pattern_key(config.alpha_pattern.keys(), module_path)
    r = config.rank_pattern.get(rank_key, config.r)
    alpha = config.alpha_pattern.get(alpha_key, config.lora_alpha)
    if r != rank:
        raise ValueError(
            f"{source!r}: module {module_path!r} has lora_A of rank {rank} but its config says r={r}; the adapter "
            "files are inconsistent."
        )
    return alpha / math.sqrt(r) if config.use_rslora else alpha / r


def load_adapter(source: str | os.PathLike) -> LoadedAdapter:
    """Read and validate a saved LoRA adapter (folder or hub id).

    Raises:
        FileNotFoundError: no such folder / repo, or no ``adapter_config.json`` or weights in it.
        ValueError: not a LoRA adapter, a non-linear variant (DoRA...), extra trained weights, non-2-D LoRA factors
            (convolutions, embeddings) or inconsistent ranks.
    """
    source = str(source)
    path = resolve_adapter_path(source)
    if not (path / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{str(path)!r} has no adapter_config.json; is it a PEFT adapter folder?")
    config = _check_lora_config(PeftConfig.from_pretrained(str(path)), source)
    if not any((path / name).is_file() for name in ("adapter_model.safetensors", "adapter_model.bin")):
        raise FileNotFoundError(f"{str(path)!r} has no adapter_model.safetensors (or .bin) weights file.")
    weights = load_peft_weights(str(path), device="cpu")
    extra = sorted(k for k in weights if not k.endswith(_LORA_SUFFIXES))
    if extra:
        raise ValueError(
            f"{source!r} contains weights other than linear LoRA factors (e.g. {extra[:3]}); they cannot be merged "
            "as task vectors. Retrain without embedding/conv LoRA, biases or modules_to_save."
        )
    modules: dict[str, LoraModule] = {}
    for key in weights:
        if not key.endswith(".lora_A.weight"):
            continue
        name = key.removesuffix(".lora_A.weight")
        a, b = weights[key], weights.get(f"{name}.lora_B.weight")
        if b is None:
            raise ValueError(f"{source!r}: {name!r} has lora_A but no lora_B; the weights file is incomplete.")
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(
                f"{source!r}: {name!r} is not a linear LoRA module (A {tuple(a.shape)}, B {tuple(b.shape)})."
            )
        scaling = _module_scaling(config, name.removeprefix("base_model.model."), a.shape[0], source)
        modules[name] = LoraModule(lora_A=a, lora_B=b, scaling=scaling)
    orphans = sorted(
        k for k in weights if k.endswith(".lora_B.weight") and k.replace("lora_B", "lora_A") not in weights
    )
    if orphans or not modules:
        raise ValueError(f"{source!r} has no complete LoRA module (lora_B without lora_A: {orphans[:3]}).")
    return LoadedAdapter(source, path, config, modules, read_delta_trl_metadata(path))


def load_base_model(name_or_path: str | os.PathLike, dtype: str | torch.dtype | None = None) -> torch.nn.Module:
    """Load a base model folder (or hub id) with the class named in its config's ``architectures``.

    ``dtype`` (e.g. ``"float32"``, the ``base_model_dtype`` an adapter records) is passed to ``from_pretrained``;
    ``None`` keeps its default.
    """
    import transformers

    config = transformers.AutoConfig.from_pretrained(name_or_path)
    architectures = getattr(config, "architectures", None) or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    if model_class is None:
        raise ValueError(
            f"Cannot tell which model class to load for {str(name_or_path)!r} (config.architectures="
            f"{architectures}); load the model yourself and pass the instance as `base_model`."
        )
    kwargs = {} if dtype is None else {"dtype": getattr(torch, dtype) if isinstance(dtype, str) else dtype}
    return model_class.from_pretrained(name_or_path, **kwargs)
