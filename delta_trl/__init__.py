"""delta_trl: DELTA (distilling linearized behaviour into LoRA fine-tuning) for Transformers and TRL.

The public API is re-exported here lazily (as TRL does): ``import delta_trl`` loads no torch, and each name's
subpackage is imported on first use. Layout, from the mathematics up (imports point one way, downwards):

- :mod:`delta_trl.core`: LoRA effective-weight plumbing, the linearized forward, the loss terms, θ0's fingerprint;
- :mod:`delta_trl.curvature`: θ0's EK-FAC/K-FAC factors, their estimation and cache, the penalty;
- :mod:`delta_trl.training`: the configs and the trainers;
- :mod:`delta_trl.merging`: exact task arithmetic on LoRA adapters;
- :mod:`delta_trl.evaluation`: scoring, α selection, diagnostics and plots;
- :mod:`delta_trl.hub`, :mod:`delta_trl.embedded`, :mod:`delta_trl.cli`: publishing, the packaged model, the CLI.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any


__version__ = "0.1.0.dev0"

_EXPORTS: dict[str, tuple[str, ...]] = {
    "delta_trl.core.adapters": ("check_linear_lora", "scaled_adapters"),
    "delta_trl.core.fingerprint": ("base_model_fingerprint",),
    "delta_trl.core.linearize": ("LinearizedOutput", "linearized_forward", "linearized_loss"),
    "delta_trl.core.losses": (
        "delta_objective",
        "dpo_loss",
        "hidden_distillation_loss",
        "sample_alpha",
        "token_cross_entropy",
    ),
    "delta_trl.curvature.cache": (
        "load_curvature",
        "load_or_estimate_curvature",
        "push_curvature_to_hub",
        "save_curvature",
    ),
    "delta_trl.curvature.estimation": ("estimate_curvature",),
    "delta_trl.curvature.factors": (
        "CurvatureFactors",
        "LayerCurvature",
        "curvature_penalty",
        "ekfac_penalty",
        "kfac_penalty",
    ),
    "delta_trl.embedded": ("load_model_and_tokenizer", "prepare_embedded_model"),
    "delta_trl.merging.merge": ("merge_adapters",),
    "delta_trl.merging.task_vector": ("TaskVector",),
    "delta_trl.training.configs": ("DeltaArguments", "DeltaConfig", "DeltaDPOConfig", "DeltaSFTConfig"),
    "delta_trl.training.delta_dpo_trainer": ("DeltaDPOTrainer",),
    "delta_trl.training.delta_sft_trainer": ("DeltaSFTTrainer",),
    "delta_trl.training.delta_trainer": ("DeltaTrainer",),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'delta_trl' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # static analysers and IDEs see the eager imports
    from delta_trl.core.adapters import check_linear_lora, scaled_adapters
    from delta_trl.core.fingerprint import base_model_fingerprint
    from delta_trl.core.linearize import LinearizedOutput, linearized_forward, linearized_loss
    from delta_trl.core.losses import (
        delta_objective,
        dpo_loss,
        hidden_distillation_loss,
        sample_alpha,
        token_cross_entropy,
    )
    from delta_trl.curvature.cache import (
        load_curvature,
        load_or_estimate_curvature,
        push_curvature_to_hub,
        save_curvature,
    )
    from delta_trl.curvature.estimation import estimate_curvature
    from delta_trl.curvature.factors import (
        CurvatureFactors,
        LayerCurvature,
        curvature_penalty,
        ekfac_penalty,
        kfac_penalty,
    )
    from delta_trl.embedded import load_model_and_tokenizer, prepare_embedded_model
    from delta_trl.merging.merge import merge_adapters
    from delta_trl.merging.task_vector import TaskVector
    from delta_trl.training.configs import DeltaArguments, DeltaConfig, DeltaDPOConfig, DeltaSFTConfig
    from delta_trl.training.delta_dpo_trainer import DeltaDPOTrainer
    from delta_trl.training.delta_sft_trainer import DeltaSFTTrainer
    from delta_trl.training.delta_trainer import DeltaTrainer
