"""Readable task-vector algebra on dense effective-weight updates (in the spirit of tangent_task_arithmetic).

A :class:`TaskVector` is ``{module: ΔW}`` with ``ΔW = s·B·A`` in ``(out, in)`` layout. ``+``, ``-``, scalar ``*``,
``dot`` and ``norm`` act module-wise, and every binary operation **raises** on mismatched modules or shapes instead
of skipping them. For writing merges to disk use :func:`delta_trl.merging.merge.merge_adapters` (exact low-rank adapter,
validated, atomic); this class is for analysis and in-memory edits.

A task vector read from an adapter keeps what its ``delta_trl.json`` records: ``evaluate_linearized`` (``linear``
mode) and ``base_model_sha256``. Combining a linearized with an ordinary vector, or vectors of two base models, raises;
:meth:`TaskVector.apply_to` refuses a linearized vector and a model whose content hash is not the recorded one.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from delta_trl.core.fingerprint import FINGERPRINT_KEY, base_model_fingerprint
from delta_trl.merging.adapter_io import load_adapter
from delta_trl.merging.merge import fold_into_model, is_linearized


@dataclass(frozen=True)
class TaskVector:
    """Dense task vector ``τ = {module: ΔW}``; ``fan_in_fan_out`` says how it is added to the base weights.

    ``evaluate_linearized``: it acts through ``f(θ0) + J·τ`` (``linear`` training mode). ``base_model_sha256``: the
    content hash of the θ0 it belongs to (:func:`delta_trl.core.fingerprint.base_model_fingerprint`), if known.
    """

    deltas: Mapping[str, torch.Tensor]
    fan_in_fan_out: bool = False
    evaluate_linearized: bool = False
    base_model_sha256: str | None = None

    @classmethod
    def from_adapter(cls, source: str | os.PathLike) -> TaskVector:
        """``τ = {module: s·B·A}`` of a saved LoRA adapter (validated by :func:`delta_trl.merging.adapter_io.load_adapter`)."""
        adapter = load_adapter(source)
        return cls(
            adapter.task_vector(),
            bool(adapter.config.fan_in_fan_out),
            evaluate_linearized=is_linearized(adapter),
            base_model_sha256=adapter.metadata.get(FINGERPRINT_KEY),
        )

    def _like(self, deltas: Mapping[str, torch.Tensor], other: TaskVector | None = None) -> TaskVector:
        """A task vector with these ``deltas`` and the properties of ``self`` (and ``other``, already checked)."""
        fingerprint = self.base_model_sha256 or (other.base_model_sha256 if other is not None else None)
        return TaskVector(deltas, self.fan_in_fan_out, self.evaluate_linearized, fingerprint)

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
        if self.evaluate_linearized != other.evaluate_linearized:
            raise ValueError(
                "Cannot combine a linearized task vector (`linear` mode) with an ordinary one: f(θ0) + J·τ1 plus "
                "f(θ0 + τ2) is neither model."
            )
        if self.base_model_sha256 and other.base_model_sha256 and self.base_model_sha256 != other.base_model_sha256:
            raise ValueError(
                f"The task vectors belong to different base models (base_model_sha256 {self.base_model_sha256[:12]}… "
                f"and {other.base_model_sha256[:12]}…); they only add up on the same θ0."
            )

    def __add__(self, other: TaskVector) -> TaskVector:
        self._check(other)
        return self._like({k: v + other.deltas[k] for k, v in self.deltas.items()}, other)

    def __neg__(self) -> TaskVector:
        return self._like({k: -v for k, v in self.deltas.items()})

    def __sub__(self, other: TaskVector) -> TaskVector:
        return self + (-other)

    def __mul__(self, scalar: float) -> TaskVector:
        if not isinstance(scalar, int | float):
            raise TypeError(f"A task vector can only be scaled by a number, not {type(scalar).__name__}.")
        return self._like({k: scalar * v for k, v in self.deltas.items()})

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
        """Add ``τ`` to ``model``'s weights **in place** (``W ← W + ΔW``) and return it.

        Raises:
            ValueError: the vector is linearized (folded weights cannot express ``f(θ0) + J·τ``), or ``model``'s
                content hash differs from the recorded ``base_model_sha256``; the model is then unchanged.
        """
        if self.evaluate_linearized:
            raise ValueError(
                "This task vector was trained in `linear` mode and acts as f(θ0) + J·τ, which weights θ0 + τ cannot "
                "express; evaluate it linearized (delta_trl.evaluation.scoring) instead of folding it."
            )
        if self.base_model_sha256:
            actual = base_model_fingerprint(model)
            if actual != self.base_model_sha256:
                raise ValueError(
                    f"The model is not the base model of this task vector: the sha256 of all its weights is "
                    f"{actual[:12]}…, the vector records {self.base_model_sha256[:12]}…. Load the checkpoint, revision "
                    "and dtype used for training."
                )
        fold_into_model(model, dict(self.deltas), self.fan_in_fan_out)
        return model
