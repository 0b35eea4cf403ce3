"""``DeltaTrainer``: DELTA for seq2seq and causal LMs trained on labels, a drop-in for ``Seq2SeqTrainer``."""

from __future__ import annotations

from typing import Any

import torch
from peft import PeftConfig, get_peft_model
from transformers import Seq2SeqTrainer
from transformers.modeling_outputs import ModelOutput

from delta_trl.core.adapters import unparked
from delta_trl.core.linearize import forward_kwargs, hidden_states_of, linearized_forward, linearized_loss
from delta_trl.core.losses import delta_objective, hidden_distillation_loss, supervised_mask, token_cross_entropy
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
        if "labels" not in inputs:
            raise ValueError(
                "DeltaTrainer needs `labels` in every batch (the teacher's loss and the distillation "
                "positions come from them)."
            )
        training = model.training
        # α only matters on the student-teacher path: linear fine-tuning trains f_lin(θ0 + τ) itself.
        alpha = self._current_alpha() if training and self._teacher_name else 1.0
        unwrapped = self.accelerator.unwrap_model(model)
        labels = inputs["labels"]
        shift = not self._is_encoder_decoder
        num_items, scale = self._loss_normalisation(num_items_in_batch)
        mask = supervised_mask(labels, shift=shift)

        def as_mean(term: torch.Tensor) -> torch.Tensor:  # the per-token value of a term, for logging
            return term.detach() / scale * (num_items / mask.sum() if num_items is not None else 1)

        def task_loss_of(logits: torch.Tensor) -> torch.Tensor:
            return token_cross_entropy(logits, labels, shift=shift, num_items=num_items) * scale

        if args.delta_mode == "linear":
            linearized = linearized_forward(unwrapped, inputs, self._student_name, differentiable=False)
            # through the wrapped model: no other forward of this step goes through DDP, which reduces gradients
            loss = linearized_loss(
                unwrapped, inputs, self._student_name, linearized, task_loss_of, alpha, forward_model=model
            )
            logits = linearized.logits(alpha)
            self._record_metrics(training, {"delta/teacher_loss": as_mean(loss)})
            return (loss, ModelOutput(loss=loss, logits=logits)) if return_outputs else loss

        student_kwargs = {**forward_kwargs(unwrapped.get_base_model(), inputs), "output_hidden_states": training}
        with self._student_at(unwrapped, alpha):
            outputs = model(**student_kwargs)
        task_loss = task_loss_of(outputs.logits)
        if not training:
            self._record_metrics(training, {"delta/task_loss": as_mean(task_loss)})
            return (task_loss, outputs) if return_outputs else task_loss

        metrics: dict[str, Any] = {}
        distill_loss = teacher_loss = None
        if self._teacher_name:
            with unparked(unwrapped, self._teacher_name):
                linearized = linearized_forward(
                    unwrapped, inputs, self._teacher_name, args.distill_layers, differentiable=False
                )
                teacher_loss = linearized_loss(unwrapped, inputs, self._teacher_name, linearized, task_loss_of, alpha)
            student_hidden = hidden_states_of(outputs, self._is_encoder_decoder)
            distill_loss = scale * sum(
                hidden_distillation_loss(student_hidden[layer], teacher_hidden, mask, num_items=num_items)
                for layer, teacher_hidden in zip(args.distill_layers, linearized.hidden(alpha), strict=True)
            )
            metrics |= {
                "delta/alpha": alpha,
                "delta/task_loss_at_alpha": as_mean(task_loss),
                "delta/teacher_loss": as_mean(teacher_loss),
                "delta/distill_loss": as_mean(distill_loss),
            }
            if not args.task_loss_at_alpha and alpha != 1.0:
                with self._student_at(unwrapped, 1.0):
                    task_loss = task_loss_of(model(**{**student_kwargs, "output_hidden_states": False}).logits)
        penalty = self._curvature_penalty(unwrapped)
        accumulation = 1
        if penalty is not None:
            metrics["delta/curvature_penalty"] = penalty
            if self.loss_is_scaled_for_ga:  # R is per optimizer step: the Trainer will not divide it, so we do
                accumulation = getattr(self, "current_gradient_accumulation_steps", args.gradient_accumulation_steps)
        loss = delta_objective(
            task_loss,
            distill_loss=distill_loss,
            teacher_loss=teacher_loss,
            curvature_penalty=penalty,
            distill_weight=args.distill_weight,
            teacher_loss_weight=args.teacher_loss_weight,
            curvature_weight=args.curvature_weight / accumulation,
        )
        metrics["delta/task_loss"] = as_mean(task_loss)
        self._record_metrics(training, metrics)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the DELTA metrics collected since the last log, averaged, as TRL trainers do."""
        mode = "train" if self.model.training else "eval"
        metrics = {key: sum(val) / len(val) for key, val in self._metrics[mode].items() if val}
        if mode == "eval":
            metrics = {f"eval_{key}": val for key, val in metrics.items()}
        super().log({**logs, **metrics}, start_time)
        self._metrics[mode].clear()
