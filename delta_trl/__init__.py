"""delta_trl: DELTA (distilling linearized behaviour into LoRA fine-tuning) for Transformers and TRL."""

__version__ = "0.1.0.dev0"

from .adapters import check_linear_lora, scaled_adapters
from .configs import DeltaArguments, DeltaConfig, DeltaDPOConfig
from .delta_dpo_trainer import DeltaDPOTrainer
from .delta_trainer import DeltaTrainer
from .embedded import load_model_and_tokenizer, prepare_embedded_model
from .linearize import LinearizedOutput, linearized_forward
from .losses import delta_objective, hidden_distillation_loss, sample_alpha, token_cross_entropy


__all__ = [
    "DeltaArguments",
    "DeltaConfig",
    "DeltaDPOConfig",
    "DeltaDPOTrainer",
    "DeltaTrainer",
    "LinearizedOutput",
    "check_linear_lora",
    "delta_objective",
    "hidden_distillation_loss",
    "linearized_forward",
    "load_model_and_tokenizer",
    "prepare_embedded_model",
    "sample_alpha",
    "scaled_adapters",
    "token_cross_entropy",
]
