"""``DeltaSFTTrainer``: DELTA for supervised fine-tuning of causal LMs, a drop-in for TRL's ``SFTTrainer``."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from peft import PeftModel
from trl import SFTTrainer

from delta_trl.training.configs import DeltaSFTConfig
from delta_trl.training.trainer_base import DeltaTrainerMixin, add_delta_adapters, check_delta_inputs


# Columns TRL's dataset preparation or a custom collator may leave in a batch that are not model inputs: the labels
# already carry them (-100 outside the completion / the assistant turns).
_NON_MODEL_KEYS = ("completion_mask", "assistant_masks", "seq_lengths")
# What a padding-free batch carries for flash-attention's variable-length kernels (no forward-mode AD).
_PADDING_FREE_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")


def _router_aux_loss_enabled(model: Any, args: DeltaSFTConfig) -> bool:
    """Whether ``SFTTrainer`` would add a MoE load-balancing loss (its own rule, read before it runs)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    coef = args.router_aux_loss_coef
    coef = getattr(config, "router_aux_loss_coef", 0.0) if coef is None else coef
    return hasattr(config, "output_router_logits") and coef != 0.0


class DeltaSFTTrainer(DeltaTrainerMixin, SFTTrainer):
    """The only change with respect to TRL's ``SFTTrainer`` is the loss (docs/METHOD.md §3), chosen by
    ``args.delta_mode``:

    - ``delta`` / ``kd_only``: ``L_S(α) + γ·L_KD(α) + β_T·L_T(α)``: the LoRA student at ``θ0 + α·τ_S``, the
      linearized teacher ``f(θ0) + α·J·τ_T`` (one JVP), their last hidden states distilled on supervised positions;
    - ``nonlinear``: exactly ``SFTTrainer``'s loss and metrics (plain LoRA SFT, no teacher);
    - ``linear``: the task loss of the linearized model alone; the saved adapter is marked ``evaluate_linearized``;
    - ``curvature_only``: the student's task loss plus ``λ·R(τ_S)``, no teacher.

    The DELTA loss is :class:`~delta_trl.DeltaTrainer`'s causal-LM loss, on the labels TRL builds: the supervised
    positions are ``labels != -100``, so ``completion_only_loss`` and ``assistant_only_loss`` select them as in TRL.
    Language-modelling, prompt-completion and conversational datasets work as in TRL; packing, padding-free batches
    and ``loss_type="dft"`` are refused by :class:`DeltaSFTConfig` in the DELTA modes. TRL's ``entropy``,
    ``mean_token_accuracy`` and ``num_tokens`` are logged for the student, ``delta/*`` beside them.

    Accepts a ``PeftModel`` with a LoRA adapter, or a model plus ``peft_config``; TRL wraps the model, then the
    teacher adapter is created from the student's LoRA config.
    """

    def __init__(self, model: Any, args: DeltaSFTConfig | None = None, *trainer_args: Any, **kwargs: Any) -> None:
        """Same arguments as ``SFTTrainer`` (positional or keyword), with ``args`` a :class:`DeltaSFTConfig`."""
        if not isinstance(args, DeltaSFTConfig):
            raise TypeError(f"DeltaSFTTrainer needs `args=DeltaSFTConfig(...)`, got {type(args).__name__}.")
        given = inspect.signature(SFTTrainer.__init__).bind(self, model, args, *trainer_args, **kwargs).arguments
        check_delta_inputs(model, given.get("peft_config"), args)
        if args.delta_mode != "nonlinear":
            self._check_sft_inputs(model, args, given)
        super().__init__(model, args, *trainer_args, **kwargs)
        unwrapped: PeftModel = self.accelerator.unwrap_model(self.model)
        add_delta_adapters(unwrapped, args)
        self._init_delta()

    @staticmethod
    def _check_sft_inputs(model: Any, args: DeltaSFTConfig, given: dict[str, Any]) -> None:
        """Refuse, before TRL tokenizes anything, what the DELTA loss would silently ignore."""
        if given.get("compute_loss_func") is not None:
            raise ValueError(
                f"delta_mode={args.delta_mode!r} computes its token-level losses itself: compute_loss_func is only "
                "supported with delta_mode='nonlinear'."
            )
        if getattr(given.get("data_collator"), "padding_free", False):
            raise ValueError(
                f"The data collator is padding-free: sequences concatenated without padding or an attention mask need "
                f"flash-attention's variable-length kernels, which have no forward-mode AD for delta_mode="
                f"{args.delta_mode!r}. Use a padded collator (padding_free=False), or delta_mode='nonlinear'."
            )
        if _router_aux_loss_enabled(model, args):
            raise ValueError(
                f"This Mixture-of-Experts model would be trained with TRL's router load-balancing loss, which "
                f"delta_mode={args.delta_mode!r} does not add to the DELTA objective. Set router_aux_loss_coef=0.0, or "
                "use delta_mode='nonlinear'."
            )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.args.delta_mode == "nonlinear":
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        packed = [key for key in _PADDING_FREE_KEYS if key in inputs]
        if packed:
            raise ValueError(
                f"This batch is padding-free ({packed}): it needs flash-attention's variable-length kernels, which "
                f"have no forward-mode AD for delta_mode={self.args.delta_mode!r}. Use a padded collator."
            )
        # the JVP pass must get model kwargs only; no KV cache in training (as SFTTrainer)
        model_inputs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        model_inputs["use_cache"] = False
        loss, outputs = self._delta_token_loss(model, model_inputs, num_items_in_batch)
        self._record_sft_metrics(model.training, outputs.logits, inputs)
        return (loss, outputs) if return_outputs else loss

    @torch.no_grad()
    def _record_sft_metrics(self, training: bool, logits: torch.Tensor, inputs: dict[str, Any]) -> None:
        """TRL's ``entropy``, ``mean_token_accuracy`` (on supervised tokens) and ``num_tokens``, as ``SFTTrainer``.

        ``logits``: ``(B, T, V)``, or ``(N, V)`` on the supervised rows only (training), in ``row_targets`` order."""
        mode = "train" if training else "eval"
        labels = inputs["labels"][:, 1:]
        mask = labels != -100
        supervised = (logits if logits.dim() == 2 else logits[:, :-1][mask]).float()  # (tokens, vocab)
        log_probs = supervised.log_softmax(-1)
        entropy_sum = -(log_probs.exp() * log_probs).sum()
        num_correct = (supervised.argmax(-1) == labels[mask]).sum()
        gather = self.accelerator.gather_for_metrics
        num_valid = gather(mask.sum()).sum()
        entropy_sum, num_correct = gather(entropy_sum).sum(), gather(num_correct).sum()
        self._metrics[mode]["entropy"].append((entropy_sum / num_valid).item() if num_valid > 0 else 0.0)
        self._metrics[mode]["mean_token_accuracy"].append((num_correct / num_valid).item() if num_valid > 0 else 0.0)
        if training:
            if "attention_mask" in inputs:
                tokens = inputs["attention_mask"].sum()
            else:
                tokens = torch.tensor(inputs["input_ids"].numel(), device=inputs["input_ids"].device)
            self._total_train_tokens += gather(tokens).sum().item() // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
