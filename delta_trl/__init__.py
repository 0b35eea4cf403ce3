"""delta_trl: DELTA (distilling linearized behaviour into LoRA fine-tuning) for Transformers and TRL."""

__version__ = "0.1.0.dev0"

from .adapters import check_linear_lora, scaled_adapters
from .configs import DeltaArguments, DeltaConfig, DeltaDPOConfig
from .curvature import CurvatureFactors, LayerCurvature, curvature_penalty, ekfac_penalty, kfac_penalty
from .curvature_cache import load_curvature, load_or_estimate_curvature, push_curvature_to_hub, save_curvature
from .curvature_estimation import estimate_curvature
from .delta_dpo_trainer import DeltaDPOTrainer
from .delta_trainer import DeltaTrainer
from .embedded import load_model_and_tokenizer, prepare_embedded_model
from .linearize import LinearizedOutput, linearized_forward, linearized_loss
from .losses import delta_objective, dpo_loss, hidden_distillation_loss, sample_alpha, token_cross_entropy
from .merging import merge_adapters
from .task_vector import TaskVector


__all__ = [
    "CurvatureFactors",
    "DeltaArguments",
    "DeltaConfig",
    "DeltaDPOConfig",
    "DeltaDPOTrainer",
    "DeltaTrainer",
    "LayerCurvature",
    "LinearizedOutput",
    "TaskVector",
    "check_linear_lora",
    "curvature_penalty",
    "delta_objective",
    "dpo_loss",
    "ekfac_penalty",
    "estimate_curvature",
    "hidden_distillation_loss",
    "kfac_penalty",
    "linearized_forward",
    "linearized_loss",
    "load_curvature",
    "load_model_and_tokenizer",
    "load_or_estimate_curvature",
    "merge_adapters",
    "prepare_embedded_model",
    "push_curvature_to_hub",
    "sample_alpha",
    "save_curvature",
    "scaled_adapters",
    "token_cross_entropy",
]
