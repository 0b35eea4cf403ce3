"""Readable task-vector algebra on dense effective-weight updates (in the spirit of tangent_task_arithmetic).

A :class:`TaskVector` is ``{module: ΔW}`` with ``ΔW = s·B·A`` in ``(out, in)`` layout. ``+``, ``-``, scalar ``*``,
``dot`` and ``norm`` act module-wise, and every binary operation **raises** on mismatched modules or shapes instead
of skipping them. For writing merges to disk use :func:`delta_trl.merging.merge_adapters` (exact low-rank adapter,
validated, atomic); this class is for analysis and in-memory edits.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .adapter_io import load_adapter
from .merging import fold_into_model


@dataclass(frozen=True)
class TaskVector:
    """Dense task vector ``τ = {module: ΔW}``; ``fan_in_fan_out`` says how it is added to the base weights."""

    deltas: Mapping[str, torch.Tensor]
    fan_in_fan_out: bool = False

    @classmethod
    def from_adapter(cls, source: str | os.PathLike) -> TaskVector:
        """``τ = {module: s·B·A}`` of a saved LoRA adapter (validated by :func:`delta_trl.adapter_io.load_adapter`)."""
        adapter = load_adapter(source)
        return cls(adapter.task_vector(), bool(adapter.config.fan_in_fan_out))

    def _check(self, other: TaskVector) -> None:
        if set(self.deltas) != set(other.deltas):
            diff = sorted(set(self.deltas) ^ set(other.deltas))[:3]
            raise ValueError(f"Task vectors cover different modules (e.g. {diff}); they belong to different setups.")
        for name, delta in self.deltas.items():
            if delta.shape != other.deltas[name].shape:
                raise ValueError(
                    f"Module {name!r}: shapes {tuple(delta.shape)} and {tuple(other.deltas[name].shape)}."
                )
        if self.fan_in_fan_out != other.fan_in_fan_out:
            raise ValueError("Task vectors disagree on fan_in_fan_out.")

    def __add__(self, other: TaskVector) -> TaskVector:
        self._check(other)
        return TaskVector({k: v + other.deltas[k] for k, v in self.deltas.items()}, self.fan_in_fan_out)

    def __neg__(self) -> TaskVector:
        return TaskVector({k: -v for k, v in self.deltas.items()}, self.fan_in_fan_out)

    def __sub__(self, other: TaskVector) -> TaskVector:
        return self + (-other)

    def __mul__(self, scalar: float) -> TaskVector:
        if not isinstance(scalar, int | float):
            raise TypeError(f"A task vector can only be scaled by a number, not {type(scalar).__name__}.")
        return TaskVector({k: scalar * v for k, v in self.deltas.items()}, self.fan_in_fan_out)

    __rmul__ = __mul__

    def dot(self, other: TaskVector) -> float:
        """``⟨τ1, τ2⟩ = Σ_modules Σ_ij ΔW1_ij·ΔW2_ij`` (Frobenius inner product over all modules)."""
        self._check(other)
        return float(sum((v.double() * other.deltas[k].double()).sum() for k, v in self.deltas.items()))

    def norm(self) -> float:
        """``‖τ‖ = √⟨τ, τ⟩``."""
        return self.dot(self) ** 0.5

    def cosine(self, other: TaskVector) -> float:
        """``⟨τ1, τ2⟩ / (‖τ1‖·‖τ2‖)``: near 0 for unrelated tasks."""
        return self.dot(other) / (self.norm() * other.norm())

    def apply_to(self, model: torch.nn.Module) -> torch.nn.Module:
        """Add ``τ`` to ``model``'s weights **in place** (``W ← W + ΔW``) and return it."""
        fold_into_model(model, dict(self.deltas), self.fan_in_fan_out)
        return model
