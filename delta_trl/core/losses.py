"""DELTA's loss terms as pure functions (docs/METHOD.md §3). Every term of the objective is defined in this module.

Normalisation convention: token-level terms are ``sum over supervised positions / num_items``. When the Trainer
passes ``num_items_in_batch`` (the supervised-token count of the whole optimizer step, over gradient-accumulation
micro-batches and processes) every term is normalised by it, exactly like the parent trainer's cross-entropy; without
it, each term is a micro-batch mean.
"""

from __future__ import annotations

import math
import random
from typing import NamedTuple

import torch
import torch.nn.functional as F


IGNORE_INDEX = -100
ALPHA_SAMPLINGS = ("curriculum", "uniform", "fixed")
DISTILL_NORMALIZATIONS = ("relative", "mean", "sum")


def alpha_bounds(progress: float, *, sampling: str, alpha_min: float, alpha_max: float) -> tuple[float, float]:
    """The interval α is drawn from at training ``progress`` ∈ [0, 1].

    - ``curriculum``: ``u = √progress``, ``α ~ U[1 − (1 − α_min)·u, 1 + (α_max − 1)·u]``: widens from {1} at the
      start to ``[α_min, α_max]`` at the end (defaults 0.5, 2.0: the paper's ``U[1 − 0.5u, 1 + u]``);
    - ``uniform``: ``[α_min, α_max]`` throughout;
    - ``fixed``: ``[1, 1]`` (α = 1: along-path distillation off).
    """
    if sampling == "fixed":
        return 1.0, 1.0
    if sampling == "uniform":
        return alpha_min, alpha_max
    if sampling == "curriculum":
        u = math.sqrt(min(max(progress, 0.0), 1.0))
        return 1.0 - (1.0 - alpha_min) * u, 1.0 + (alpha_max - 1.0) * u
    raise ValueError(f"Unknown alpha sampling {sampling!r}; choose one of {ALPHA_SAMPLINGS}.")


def sample_alpha(
    step: int, max_steps: int, *, sampling: str, alpha_min: float, alpha_max: float, seed: int = 0
) -> float:
    """Draw the α of optimizer step ``step`` (of ``max_steps``).

    A pure function of ``(seed, step)``: every gradient-accumulation micro-batch and every process of one optimizer
    step gets the same α, and a resumed run draws the same sequence as an uninterrupted one.
    """
    low, high = alpha_bounds(step / max(max_steps, 1), sampling=sampling, alpha_min=alpha_min, alpha_max=alpha_max)
    return random.Random(f"delta_trl-alpha-{seed}-{step}").uniform(low, high)


def supervised_mask(labels: torch.Tensor, *, shift: bool) -> torch.Tensor:
    """Positions whose output is supervised, aligned with the model's hidden states / logits, shape ``(B, T)``.

    For causal LMs (``shift=True``) position ``t`` predicts ``labels[t + 1]``, so the last position is never
    supervised; for encoder-decoder models (``shift=False``) decoder position ``t`` predicts ``labels[t]``.
    """
    mask = labels != IGNORE_INDEX
    if shift:
        mask = torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], dim=1)
    return mask


def _upcast(tensor: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> fp32 for softmax and squared errors; fp32/fp64 stay as they are."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


def _normalise(total: torch.Tensor, count: torch.Tensor, num_items: torch.Tensor | int | None) -> torch.Tensor:
    denominator = num_items if num_items is not None else count.clamp(min=1)
    if isinstance(denominator, torch.Tensor):
        denominator = denominator.to(total.device)
    return total / denominator


def token_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    shift: bool,
    num_items: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """``Σ_{supervised t} −log softmax(logits_t)[y_t] / N``: the LM task loss, also on linearized logits.

    ``logits`` ``(B, T, V)``, ``labels`` ``(B, T)`` with ``-100`` for ignored positions; ``shift`` for causal LMs.
    ``N = num_items`` if given (token-exact over the optimizer step) else the number of supervised tokens. Matches
    ``transformers``' ``ForCausalLMLoss`` / T5's loss.
    """
    labels = labels.to(logits.device)
    if shift:  # shift the labels, not the logits: slicing (B, T, V) would copy it, forward and backward
        labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    total = F.cross_entropy(
        _upcast(logits).flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return _normalise(total, (labels != IGNORE_INDEX).sum(), num_items)


def hidden_distillation_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    mask: torch.Tensor,
    *,
    num_items: torch.Tensor | int | None = None,
    normalization: str = "relative",
) -> torch.Tensor:
    """Along-path distillation ``L_KD = Σ_{t ∈ mask} d_t / N`` (docs/METHOD.md §3.4), with ``N = num_items`` if
    given, else ``mask.sum()``, and the per-position distance ``d_t`` chosen by ``normalization``:

    - ``"relative"``: ``‖h_S,t − sg(h_T,t)‖²₂ / ‖sg(h_T,t)‖²₂``, the squared error relative to the teacher's
      hidden-state norm. Invariant to the hidden size and to the scale of the model's activations, so one γ serves
      every model (the default; docs/ARCHITECTURE.md, "Choosing γ").
    - ``"mean"``: ``‖h_S,t − sg(h_T,t)‖²₂ / H``, the mean squared error over the hidden dimension ``H``.
    - ``"sum"``: ``‖h_S,t − sg(h_T,t)‖²₂``, the paper's formula; its size grows with ``H`` and the activations
      (~10³ on SmolLM2-135M), so γ must be scaled for each model.

    The teacher is detached: it receives no gradient from this term. Shapes: hidden ``(B, T, H)``, mask ``(B, T)``.
    """
    if normalization not in DISTILL_NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {DISTILL_NORMALIZATIONS}, got {normalization!r}.")
    teacher = _upcast(teacher_hidden.detach())
    per_position = (_upcast(student_hidden) - teacher).pow(2).sum(dim=-1)  # (B, T)
    if normalization == "relative":
        # the floor only guards all-zero teacher states (never seen at supervised positions of a real model)
        per_position = per_position / teacher.pow(2).sum(dim=-1).clamp(min=torch.finfo(teacher.dtype).tiny)
    elif normalization == "mean":
        per_position = per_position / teacher.shape[-1]
    mask = mask.to(per_position.device)
    return _normalise((per_position * mask).sum(), mask.sum(), num_items)


def delta_objective(
    task_loss: torch.Tensor,
    *,
    distill_loss: torch.Tensor | None = None,
    teacher_loss: torch.Tensor | None = None,
    curvature_penalty: torch.Tensor | None = None,
    distill_weight: float = 1.0,
    teacher_loss_weight: float = 1.0,
    curvature_weight: float = 0.0,
) -> torch.Tensor:
    """``L = L_S + γ·L_KD + β_T·L_T + λ·(R(τ_S) + R(τ_T))`` (docs/METHOD.md §3.6); absent terms count as 0.

    ``curvature_penalty`` is the already-summed ``R(τ_S) + R(τ_T)`` (or ``R(τ_S)`` alone in ``curvature_only``).
    """
    total = task_loss
    for weight, term in (
        (distill_weight, distill_loss),
        (teacher_loss_weight, teacher_loss),
        (curvature_weight, curvature_penalty),
    ):
        if term is not None and weight != 0:
            total = total + weight * term
    return total


class PreferenceLossOutput(NamedTuple):
    """Per-sequence DPO losses and the implicit rewards ``β·(log π − log π_ref)`` (detached), shape ``(B,)``."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def completion_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``Σ_t log softmax(logits_t)[y_{t+1}]`` over supervised (non ``-100``) tokens: a causal LM's sequence log-prob.

    ``logits`` ``(B, T, V)`` (also linearized logits ``f(θ0) + α·J·τ``), ``labels`` ``(B, T)``; returns ``(B,)``.
    """
    logits, labels = _upcast(logits[:, :-1, :]), labels[:, 1:].to(logits.device)
    mask = labels != IGNORE_INDEX
    per_token = torch.gather(logits.log_softmax(-1), 2, labels.clamp(min=0)[..., None])[..., 0]  # (B, T-1)
    return (per_token * mask).sum(-1)


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
) -> PreferenceLossOutput:
    """Sigmoid DPO (Rafailov et al. 2023, huggingface.co/papers/2305.18290), per sequence:

    ``L = −log σ(β·[(log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))])``

    For the DELTA teacher, ``π`` is the linearized policy (log-probs of ``f(θ0) + α·J·τ_T``) and ``π_ref`` the base
    model, i.e. the JVP's primal: tangent-space ("linear") DPO. All inputs ``(B,)``.
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps  # (B,)
    rejected_logratios = policy_rejected_logps - ref_rejected_logps  # (B,)
    losses = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))
    return PreferenceLossOutput(losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach())
