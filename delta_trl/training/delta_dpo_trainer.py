"""``DeltaDPOTrainer``: DELTA for preference optimization ("Distilled DPO"), a drop-in for TRL's ``DPOTrainer``."""

from __future__ import annotations

import contextlib
import inspect
from typing import Any

import torch
from peft import PeftModel
from transformers.modeling_outputs import ModelOutput
from trl import DPOTrainer

from delta_trl.core.adapters import lora_layers, scaled_adapters, unparked
from delta_trl.core.linearize import (
    TeacherPass,
    linearized_forward,
    linearized_loss,
    linearized_teacher_loss,
    logits_on_rows,
)
from delta_trl.core.losses import (
    delta_objective,
    dpo_loss,
    hidden_distillation_loss,
    supervised_mask,
)
from delta_trl.core.rows import row_targets, rows_sequence_logps
from delta_trl.training.configs import DeltaDPOConfig
from delta_trl.training.trainer_base import DeltaTrainerMixin, add_delta_adapters, check_delta_inputs


PREFERENCE_COLUMNS = (("chosen", "rejected"), ("prompt_ids", "chosen_ids", "rejected_ids"))
_NON_MODEL_KEYS = ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")


def _check_preference_columns(dataset: Any, name: str) -> None:
    if isinstance(dataset, dict):
        for key, split in dataset.items():
            _check_preference_columns(split, f"{name}[{key!r}]")
        return
    columns = getattr(dataset, "column_names", None)
    if columns is None:  # iterable datasets without known features are checked by TRL when it tokenizes
        return
    if not any(set(required) <= set(columns) for required in PREFERENCE_COLUMNS):
        raise ValueError(
            f"The {name} has columns {columns}, but preference data needs `chosen` and `rejected` (and usually "
            "`prompt`), in TRL's standard or conversational format."
        )


class DeltaDPOTrainer(DeltaTrainerMixin, DPOTrainer):
    """The only change with respect to ``DPOTrainer`` is the loss (docs/METHOD.md §3), chosen by ``args.delta_mode``:

    - ``delta`` / ``kd_only``: ``DPO_S(α) + γ·L_KD(α) + β_T·DPO_T(α)``. The student's DPO loss at ``θ0 + α·τ_S``;
      the teacher's is *linear DPO*: its policy log-probs come from the linearized logits ``f(θ0) + α·J·τ_T`` of one
      JVP, whose primal ``f(θ0)`` is the reference model, so no separate reference forward runs. ``L_KD`` distils the
      teacher's last hidden state into the student's on the completion tokens of chosen and rejected responses.
    - ``nonlinear``: exactly ``DPOTrainer``'s loss and metrics.
    - ``linear``: linear DPO of the adapter alone;
    - ``curvature_only``: the student's DPO loss plus ``λ·R(τ_S)``, no teacher.

    With ``curvature_weight`` λ > 0, ``delta`` adds ``λ·(R(τ_S) + R(τ_T))`` (the paper's Distilled DPO left it off).

    DPO's metrics (``rewards/*``, ``logps/*``) are logged for the student, the DELTA terms beside them (``delta/*``).
    The reference is the base model θ0. When TRL would use another reference (a ``ref_model``, or a pre-trained
    adapter it copies to ``"ref"``), set ``precompute_ref_log_probs=True`` or the ``ref_model`` is run once per batch.
    """

    loss_is_scaled_for_ga = False  # as DPOTrainer: every term is a micro-batch mean

    def __init__(self, model: Any, ref_model: Any = None, args: DeltaDPOConfig | None = None, *trainer_args, **kwargs):
        """Same arguments as ``DPOTrainer`` (positional or keyword), with ``args`` a :class:`DeltaDPOConfig`."""
        if not isinstance(args, DeltaDPOConfig):
            raise TypeError(f"DeltaDPOTrainer needs `args=DeltaDPOConfig(...)`, got {type(args).__name__}.")
        given = inspect.signature(DPOTrainer.__init__).bind(self, model, ref_model, args, *trainer_args, **kwargs)
        check_delta_inputs(model, given.arguments.get("peft_config"), args)
        if isinstance(model, PeftModel) and "default" not in model.peft_config:
            raise ValueError(
                f"TRL's DPOTrainer builds its reference from the adapter named 'default', and this PeftModel's "
                f"adapters are {sorted(model.peft_config)}. Load the adapter as 'default' "
                "(PeftModel.from_pretrained(base, path) does), or pass the base model with a peft_config."
            )
        for name in ("train_dataset", "eval_dataset"):
            if given.arguments.get(name) is not None:
                _check_preference_columns(given.arguments[name], name)
        super().__init__(model, ref_model, args, *trainer_args, **kwargs)
        unwrapped: PeftModel = self.accelerator.unwrap_model(self.model)
        if args.delta_mode != "nonlinear":
            self._reference = self._reference_source(unwrapped, args)
        add_delta_adapters(unwrapped, args)
        self._init_delta()

    def _reference_source(self, model: PeftModel, args: DeltaDPOConfig) -> str:
        """Where reference log-probs come from: ``"precomputed"``, ``"ref_model"`` or ``"base"`` (the JVP primal)."""
        if args.precompute_ref_log_probs:
            return "precomputed"
        if self.ref_model is not None:
            return "ref_model"
        if any(layer.lora_B["ref"].weight.abs().max() > 0 for layer in lora_layers(model, "ref")):
            raise ValueError(
                'The PeftModel\'s adapter is already trained, so TRL made a copy of it ("ref") the DPO reference; '
                "the linearized teacher's reference is the base model θ0, and switching adapters inside a DELTA step "
                "would freeze the teacher. Set precompute_ref_log_probs=True (the reference is then computed once, "
                "before training), or pass the base model with a peft_config."
            )
        return "base"

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args: DeltaDPOConfig = self.args
        if args.delta_mode == "nonlinear":
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        training = model.training
        linear = args.delta_mode == "linear"
        alpha = self._current_alpha() if training and self._teacher_name else 1.0
        unwrapped = self.accelerator.unwrap_model(model)
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        with_teacher = linear or (training and self._teacher_runs())

        # every log-prob is taken on the completion rows only ((N, V), never a (B, T, V) log-softmax)
        rows, targets = row_targets(labels, shift=True)

        def sequence_logps(row_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return rows_sequence_logps(row_logits, targets, rows).chunk(2)

        teacher = teacher_loss = teacher_states = None
        metrics: dict[str, Any] = {}
        if with_teacher:  # first, so that its θ0 graph is freed before the student's graph exists
            adapter = self._student_name if linear else self._teacher_name
            with contextlib.nullcontext() if linear else unparked(unwrapped, adapter):
                wrapped = linear and model is not unwrapped and torch.is_grad_enabled()
                if wrapped:
                    # DDP/DeepSpeed wrap outputs in autograd functions without a forward-mode rule, and `linear`'s θ0
                    # pass must go through the wrapper: a no-graph JVP, then a wrapped θ0 pass (linearized_loss)
                    full = linearized_forward(unwrapped, model_kwargs, adapter, (), differentiable=False)
                    teacher = TeacherPass(rows, full.base_logits[rows], full.tangent_logits[rows], (), ())
                else:
                    teacher = self._teacher_forward(
                        unwrapped, model_kwargs, adapter, rows, () if linear else args.distill_layers
                    )
                ref_chosen, ref_rejected = self._reference_logps(model, unwrapped, inputs, model_kwargs, teacher)

                teacher_logps: tuple[torch.Tensor, ...] = ()

                def teacher_dpo(row_logits: torch.Tensor) -> torch.Tensor:
                    nonlocal teacher_logps
                    chosen, rejected = sequence_logps(row_logits)
                    teacher_logps = (chosen.detach(), rejected.detach())  # for the metrics: no second (N, V) pass
                    return dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=args.beta).losses.mean()

                if wrapped:
                    teacher_loss = linearized_loss(
                        unwrapped,
                        model_kwargs,
                        adapter,
                        full,
                        lambda z: teacher_dpo(z[rows]),
                        alpha,
                        forward_model=model,
                    )
                else:
                    teacher_loss = linearized_teacher_loss(unwrapped, adapter, teacher, teacher_dpo, alpha)
            teacher_dpo_output = dpo_loss(*teacher_logps, ref_chosen, ref_rejected, beta=args.beta)  # for the metrics
            if not linear:  # the student needs the hidden states only: the (N, V) logits go before its pass
                teacher_states, teacher = teacher.hidden(alpha), None
                metrics |= {
                    "delta/teacher_loss": teacher_loss,
                    **_reward_metrics(teacher_dpo_output, "delta/teacher_"),
                }
        else:
            ref_chosen, ref_rejected = self._reference_logps(model, unwrapped, inputs, model_kwargs, None)
        logits = None
        if linear:
            loss, policy, policy_logps = teacher_loss, teacher_dpo_output, teacher_logps
            if return_outputs:
                logits = teacher.full_logits(alpha)
        else:
            base = unwrapped.get_base_model()
            # without `return_outputs` nobody reads the student's logits off the completion rows: the LM head skips them
            on_rows = contextlib.nullcontext() if return_outputs else logits_on_rows(base, rows)
            with self._student_at(unwrapped, alpha), on_rows:
                outputs = model(**model_kwargs, output_hidden_states=teacher_states is not None)
            row_logits = outputs.logits[rows] if return_outputs else outputs.logits
            logits = outputs.logits if return_outputs else None
            policy_logps = sequence_logps(row_logits)
            policy = dpo_loss(*policy_logps, ref_chosen, ref_rejected, beta=args.beta)
            metrics["delta/task_loss"] = policy.losses.mean()
            distill = None
            if teacher_states is not None:
                mask = supervised_mask(labels, shift=True)
                distill = sum(
                    hidden_distillation_loss(
                        outputs.hidden_states[layer], teacher_hidden, mask, normalization=args.distill_normalization
                    )
                    for layer, teacher_hidden in zip(args.distill_layers, teacher_states, strict=True)
                )
                metrics |= {"delta/distill_loss": distill, "delta/alpha": alpha}
            # every term is a micro-batch mean (loss_is_scaled_for_ga = False): the Trainer divides by accumulation
            penalty = self._curvature_penalty(unwrapped, with_teacher=teacher_states is not None) if training else None
            if penalty is not None:
                metrics["delta/curvature_penalty"] = penalty
            loss = delta_objective(
                policy.losses.mean(),
                distill_loss=distill,
                teacher_loss=teacher_loss,
                curvature_penalty=penalty,
                distill_weight=args.distill_weight,
                teacher_loss_weight=args.teacher_loss_weight,
                curvature_weight=args.curvature_weight,
            )
        metrics |= _reward_metrics(policy, "")
        metrics |= {"logps/chosen": policy_logps[0].mean(), "logps/rejected": policy_logps[1].mean()}
        self._record_metrics(training, {k: torch.as_tensor(v).detach() for k, v in metrics.items()})
        return (loss, ModelOutput(loss=loss, logits=logits)) if return_outputs else loss

    def _reference_logps(self, model, unwrapped, inputs, model_kwargs, teacher):
        if self._reference == "precomputed":
            return inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        if self._reference == "ref_model":
            return self.compute_ref_log_probs(self.ref_model, inputs)
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        rows, targets = row_targets(labels, shift=True)
        if teacher is not None:  # the teacher pass's primal is f(θ0) on the completion rows: the reference, for free
            return rows_sequence_logps(teacher.base_logits, targets, rows).chunk(2)
        adapters = dict.fromkeys(unwrapped.peft_config, 0.0)
        with torch.no_grad(), scaled_adapters(unwrapped, adapters), logits_on_rows(unwrapped.get_base_model(), rows):
            return rows_sequence_logps(model(**model_kwargs).logits, targets, rows).chunk(2)


def _reward_metrics(output, prefix: str) -> dict[str, torch.Tensor]:
    margins = output.chosen_rewards - output.rejected_rewards
    return {
        f"{prefix}rewards/chosen": output.chosen_rewards.mean(),
        f"{prefix}rewards/rejected": output.rejected_rewards.mean(),
        f"{prefix}rewards/accuracies": (margins > 0).float().mean(),
        f"{prefix}rewards/margins": margins.mean(),
    }
