"""``DeltaTrainer``: DELTA for seq2seq and causal LMs trained on labels, a drop-in for ``Seq2SeqTrainer``."""

from __future__ import annotations

from typing import Any

import torch
from peft import PeftConfig, get_peft_model
from transformers import Seq2SeqTrainer

from delta_trl.training.configs import DeltaConfig
from delta_trl.training.trainer_base import DeltaTrainerMixin, add_delta_adapters, check_delta_inputs


class DeltaTrainer(DeltaTrainerMixin, Seq2SeqTrainer):
    """The only change with respect to ``Seq2SeqTrainer`` is the loss (docs/METHOD.md §3), chosen by ``args.delta_mode``:

    - ``delta`` / ``kd_only``: ``L_S(α) + γ·L_KD(α) + β_T·L_T(α)``: the LoRA student at ``θ0 + α·τ_S``, the
      linearized teacher ``f(θ0) + α·J·τ_T`` (one JVP), their last hidden states distilled on supervised positions;
    - ``nonlinear``: exactly ``Seq2SeqTrainer``'s loss (plain LoRA fine-tuning, no teacher);
    - ``linear``: the task loss of the linearized model alone (tangent-space fine-tuning of the adapter); its
      evaluation is linearized too, and the saved adapter is marked ``evaluate_linearized``;
    - ``curvature_only``: the student's task loss plus ``λ·R(τ_S)``, no teacher.

    With ``curvature_weight`` λ > 0, ``delta`` adds ``λ·(R(τ_S) + R(τ_T))``, the EK-FAC GGN penalty of θ0
    (:mod:`delta_trl.curvature.factors`).

    Accepts a ``PeftModel`` with a LoRA adapter, or a model plus ``peft_config``; the teacher adapter is created from
    the student's LoRA config. Evaluation reports the student at α = 1.
    """

    # `None` (the parent's inference) in `nonlinear` mode; otherwise set by `_loss_normalisation` for each batch.
    loss_is_scaled_for_ga = None

    def __init__(
        self,
        model: Any = None,
        args: DeltaConfig | None = None,
        *trainer_args: Any,
        peft_config: PeftConfig | None = None,
        **trainer_kwargs: Any,
    ) -> None:
        if not isinstance(args, DeltaConfig):
            raise TypeError(f"DeltaTrainer needs `args=DeltaConfig(...)`, got {type(args).__name__}.")
        if args.delta_mode == "linear" and args.predict_with_generate:
            raise ValueError(
                "A `linear`-mode adapter must be evaluated linearized, and generation cannot be: set "
                "predict_with_generate=False (the eval loss and logits are linearized)."
            )
        if args.delta_mode != "nonlinear" and (args.label_smoothing_factor or trainer_kwargs.get("compute_loss_func")):
            raise ValueError(
                f"delta_mode={args.delta_mode!r} computes its token-level losses itself: label_smoothing_factor and "
                "compute_loss_func are only supported with delta_mode='nonlinear'."
            )
        check_delta_inputs(model, peft_config, args)
        if peft_config is not None:
            model = get_peft_model(model, peft_config)
        add_delta_adapters(model, args)
        super().__init__(model, args, *trainer_args, **trainer_kwargs)
        self._init_delta()
        self._is_encoder_decoder = bool(getattr(model.get_base_model().config, "is_encoder_decoder", False))

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        args: DeltaConfig = self.args
        if args.delta_mode == "nonlinear":
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss, outputs = self._delta_token_loss(model, inputs, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the DELTA metrics collected since the last log, averaged, as TRL trainers do."""
        mode = "train" if self.model.training else "eval"
        metrics = {key: sum(val) / len(val) for key, val in self._metrics[mode].items() if val}
        if mode == "eval":
            metrics = {f"eval_{key}": val for key, val in metrics.items()}
        super().log({**logs, **metrics}, start_time)
        self._metrics[mode].clear()
