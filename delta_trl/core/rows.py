"""Token-level losses on selected rows: the logits of the supervised positions only, ``(N, V)`` instead of
``(B, T, V)``.

The linearized teacher computes its logits on the positions a loss reads (:func:`delta_trl.core.linearize.
linearized_teacher_forward`): for a causal LM position ``t`` predicts ``labels[t + 1]``, for an encoder-decoder model
decoder position ``t`` predicts ``labels[t]`` (:func:`delta_trl.core.losses.supervised_mask`). Row ``i`` of the
selected logits is the ``i``-th supervised position in row-major order. Each function equals its full-tensor
counterpart in :mod:`delta_trl.core.losses` on the same logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from delta_trl.core.losses import IGNORE_INDEX, supervised_mask


def row_targets(labels: torch.Tensor, *, shift: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, targets)``: the supervised positions ``(B, T)`` bool and their target tokens ``(N,)``."""
    rows = supervised_mask(labels, shift=shift)
    if shift:
        labels = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], dim=1)
    return rows, labels[rows]


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def rows_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, num_items: torch.Tensor | int | None = None
) -> torch.Tensor:
    """``Σ_i −log softmax(z_i)[y_i] / N`` over the rows ``z`` ``(N_rows, V)``, ``N = num_items`` if given, else the
    number of rows: :func:`delta_trl.core.losses.token_cross_entropy` on the selected positions."""
    total = F.cross_entropy(_upcast(logits), targets.to(logits.device), reduction="sum")
    denominator = num_items if num_items is not None else max(targets.numel(), 1)
    if isinstance(denominator, torch.Tensor):
        denominator = denominator.to(total.device)
    return total / denominator


def rows_sequence_logps(logits: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``Σ_{t supervised} log softmax(z_t)[y_t]`` per sequence, ``(B,)``, from the rows ``z`` ``(N, V)``:
    :func:`delta_trl.core.losses.completion_logps` without a ``(B, T, V)`` log-softmax."""
    per_row = -F.cross_entropy(_upcast(logits), targets.to(logits.device), reduction="none")  # (N,)
    sequence = torch.arange(rows.shape[0], device=rows.device)[:, None].expand_as(rows)[rows].to(per_row.device)
    return per_row.new_zeros(rows.shape[0]).index_add(0, sequence, per_row)
