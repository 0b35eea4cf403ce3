"""Pure tensor functions that combine dense task vectors ``ΔW_t`` of one module: task arithmetic, TIES and DARE.

Every method is a setting of three independent axes (mergekit's layout, STYLE.md §8), applied to the per-task
effective-weight updates ``ΔW_t = s_t·B_t·A_t`` (never to the LoRA factors separately)::

    1. sparsify   δ_t = sparsify(ΔW_t, density, sparsification)
    2. consensus  σ = sign_consensus(stack_t(w_t·δ_t)),  m_t = 1[sign(w_t·δ_t) = σ]   (optional)
    3. combine    ΔW = λ · Σ_t m_t·w_t·δ_t  /  (Σ_t m_t·1[δ_t ≠ 0] if normalize else 1)

=====================  ==============  =============  ==========
method                 sparsification  consensus      normalize
=====================  ==============  =============  ==========
``task_arithmetic``    none            none           no
``ties``               magnitude       sum            yes (disjoint mean)
``dare``               random          none           no
=====================  ==============  =============  ==========

Only ``task_arithmetic`` is exact for LoRA adapters (the sum of low-rank updates is what the concatenated adapter
computes). TIES (Yadav et al., https://huggingface.co/papers/2306.01708) and DARE (Yu et al.,
https://huggingface.co/papers/2311.03099) are comparison baselines; their result is generally full rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

import torch


class MergeMethod(str, Enum):
    """How the task vectors are combined (see the module table)."""

    TASK_ARITHMETIC = "task_arithmetic"
    TIES = "ties"
    DARE = "dare"


class Sparsification(str, Enum):
    """Which entries of a task vector survive: none, the largest magnitudes (TIES trim) or a random subset (DARE)."""

    NONE = "none"
    MAGNITUDE = "magnitude"
    RANDOM = "random"


class Consensus(str, Enum):
    """How the elected sign of an entry is chosen: the sign of the summed values (TIES) or of the summed signs."""

    SUM = "sum"
    COUNT = "count"


@dataclass(frozen=True)
class MethodSettings:
    """One row of the method table: the settings of the three axes."""

    sparsification: Sparsification
    consensus: Consensus | None
    normalize: bool


METHOD_SETTINGS: dict[MergeMethod, MethodSettings] = {
    MergeMethod.TASK_ARITHMETIC: MethodSettings(Sparsification.NONE, None, normalize=False),
    MergeMethod.TIES: MethodSettings(Sparsification.MAGNITUDE, Consensus.SUM, normalize=True),
    MergeMethod.DARE: MethodSettings(Sparsification.RANDOM, None, normalize=False),
}


def check_density(density: float) -> None:
    """Raise unless ``0 < density <= 1``."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1] (the fraction of entries kept); got {density}.")


def sparsify(
    delta: torch.Tensor,
    density: float,
    method: Sparsification | str,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Keep a fraction ``density`` of the entries of ``delta`` and zero the rest.

    - ``magnitude`` (TIES "trim"): keep the ``k = round(density·numel)`` entries of largest ``|δ|``, unchanged.
    - ``random`` (DARE "drop and rescale"): keep each entry independently with probability ``density`` and divide the
      survivors by ``density``, so ``E[sparsify(δ)] = δ``.
    - ``none``: return ``delta`` unchanged.

    Args:
        delta: a task vector of any shape.
        density: fraction of entries kept, in ``(0, 1]``.
        method: a :class:`Sparsification`.
        generator: random generator for ``random`` (for reproducible masks).

    Returns:
        A new tensor of the same shape and dtype.
    """
    method = Sparsification(method)
    check_density(density)
    if method is Sparsification.NONE or density == 1.0:
        return delta.clone()
    if method is Sparsification.MAGNITUDE:
        k = max(1, round(density * delta.numel()))
        flat = delta.flatten()
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[flat.abs().topk(k).indices] = True
        return torch.where(keep.view_as(delta), delta, torch.zeros_like(delta))
    keep = torch.rand(delta.shape, generator=generator, device=delta.device) < density
    return torch.where(keep, delta / density, torch.zeros_like(delta))


def sign_consensus(stacked: torch.Tensor, method: Consensus | str = Consensus.SUM) -> torch.Tensor:
    """Elected sign per entry of a stack of (weighted) task vectors ``(T, ...)``: TIES "elect".

    ``sum``: ``σ = sign(Σ_t δ_t)``; ``count``: ``σ = sign(Σ_t sign(δ_t))``. A tie (0) elects ``+1``, as PEFT's
    ``calculate_majority_sign_mask`` does, so every entry has a sign.

    Returns:
        Tensor of ``±1`` with shape ``stacked.shape[1:]`` and ``stacked``'s dtype.
    """
    method = Consensus(method)
    total = stacked.sum(dim=0) if method is Consensus.SUM else stacked.sign().sum(dim=0)
    return torch.where(total >= 0, 1.0, -1.0).to(stacked.dtype)


def combine(
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    sparsification: Sparsification | str = Sparsification.NONE,
    density: float = 1.0,
    consensus: Consensus | str | None = None,
    normalize: bool = False,
    lam: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Combine the task vectors of one module: ``ΔW = λ · Σ_t m_t·w_t·δ_t / n`` (see the module docstring).

    Args:
        deltas: task vectors ``ΔW_t`` of identical shape.
        weights: coefficients ``w_t`` (negative values negate a task).
        sparsification, density: applied to each ``ΔW_t`` first (:func:`sparsify`).
        consensus: if set, only entries whose weighted sign agrees with :func:`sign_consensus` are kept.
        normalize: divide each entry by the number of tasks that contribute a non-zero value to it (TIES "disjoint
            mean"); entries with no contributor stay 0.
        lam: global scale ``λ`` applied last.

    Returns:
        The merged ``ΔW``, same shape and dtype as the inputs.
    """
    if len(deltas) != len(weights):
        raise ValueError(f"Got {len(deltas)} task vectors but {len(weights)} weights.")
    if not deltas:
        raise ValueError("At least one task vector is needed.")
    shapes = {tuple(d.shape) for d in deltas}
    if len(shapes) != 1:
        raise ValueError(f"Task vectors of one module must have the same shape; got {sorted(shapes)}.")
    weighted = torch.stack(
        [w * sparsify(d, density, sparsification, generator=generator) for d, w in zip(deltas, weights, strict=True)]
    )  # (T, out, in)
    contributes = weighted != 0
    if consensus is not None:
        contributes &= weighted.sign() == sign_consensus(weighted, consensus)
    merged = torch.where(contributes, weighted, torch.zeros_like(weighted)).sum(dim=0)
    if normalize:
        merged = merged / contributes.sum(dim=0).clamp(min=1).to(merged.dtype)
    return lam * merged


def combine_with_method(
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    method: MergeMethod | str,
    *,
    density: float = 1.0,
    lam: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """:func:`combine` with the axes set from :data:`METHOD_SETTINGS` for ``method``."""
    settings = METHOD_SETTINGS[MergeMethod(method)]
    return combine(
        deltas,
        weights,
        sparsification=settings.sparsification,
        density=density,
        consensus=settings.consensus,
        normalize=settings.normalize,
        lam=lam,
        generator=generator,
    )


def low_rank_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-``rank`` factorisation ``ΔW ≈ B·A`` (truncated SVD, Eckart–Young) and its relative error.

    ``ΔW = U S Vᵀ``; ``B = U_k·√S_k`` (out, k), ``A = √S_k·V_kᵀ`` (k, in), splitting the singular values evenly so
    both factors have comparable norms. The error is ``‖ΔW − B·A‖_F / ‖ΔW‖_F`` (0 for ``ΔW = 0``).
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}.")
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    b = u[:, :k] * root
    a = root[:, None] * vh[:k]
    if k < rank:
        # Keep the requested rank so every module of the adapter has the rank written in its config.
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - k)], dim=1)
        a = torch.cat([a, a.new_zeros(rank - k, a.shape[1])], dim=0)
    norm = delta.double().norm()
    error = 0.0 if norm == 0 else float((delta.double() - b @ a).norm() / norm)
    return b.to(delta.dtype), a.to(delta.dtype), error
