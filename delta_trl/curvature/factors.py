"""Task-agnostic curvature of the base model (docs/METHOD.md §4): K-FAC / EK-FAC factors of the GGN at θ0 and the penalty.

With ``J`` the Jacobian of the final hidden states with respect to the weights, the GGN of a squared loss on the
output at θ0 is ``G = E_x[Jᵀ J]`` and the output drift caused by a task vector ``τ`` is ``R(τ) = τᵀ G τ``. Per LoRA
target linear layer ``W`` (``d_out × d_in``) the GGN block is approximated by Kronecker factors of the layer inputs
``a`` and the backpropagated output gradients ``g``::

    K-FAC:   G_W ≈ A ⊗ G,               A = E[a aᵀ],  G = E[g gᵀ]
    EK-FAC:  G_W ≈ (U_A ⊗ U_G) diag(vec D) (U_A ⊗ U_G)ᵀ,   A = U_A Λ_A U_Aᵀ,  G = U_G Λ_G U_Gᵀ,
             D = E_n[(U_Gᵀ ∇W_n U_A)²]  (George et al. 2018, https://huggingface.co/papers/1806.03884)

and the LoRA update ``ΔW = s·B·A_l`` (``B``: ``d_out × r``, ``A_l``: ``r × d_in``) is penalised without ever forming
``ΔW`` in the original basis. The factors are estimated by :mod:`delta_trl.curvature.estimation` and stored by
:mod:`delta_trl.curvature.cache`; this module holds the types, the pure maths and :func:`curvature_penalty`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora import LoraLayer

from delta_trl.core.adapters import check_linear_lora, lora_layers, nominal_scaling


ESTIMATORS = ("ekfac", "kfac")
# Tensor names stored per layer, by estimator.
TENSOR_NAMES = {"kfac": ("A", "G"), "ekfac": ("U_A", "lambda_A", "U_G", "lambda_G", "D")}


@dataclass(frozen=True)
class LayerCurvature:
    """Curvature factors of one linear layer ``W`` (``d_out × d_in``) at θ0.

    Attributes:
        estimator: ``"kfac"`` or ``"ekfac"``.
        tensors: for K-FAC ``A`` (``d_in × d_in``) and ``G`` (``d_out × d_out``); for EK-FAC the eigenbases ``U_A``
            (``d_in × d_in``), ``U_G`` (``d_out × d_out``), their eigenvalues ``lambda_A`` (``d_in``), ``lambda_G``
            (``d_out``) and the eigenvalue correction ``D`` (``d_out × d_in``).
    """

    estimator: str
    tensors: dict[str, torch.Tensor]

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"Unknown curvature estimator {self.estimator!r}; choose one of {ESTIMATORS}.")
        expected = set(TENSOR_NAMES[self.estimator])
        if set(self.tensors) != expected:
            raise ValueError(
                f"A {self.estimator} layer needs the tensors {sorted(expected)}, got {sorted(self.tensors)}."
            )

    @property
    def shape(self) -> tuple[int, int]:
        """``(d_out, d_in)`` of the layer."""
        if self.estimator == "kfac":
            return self.tensors["G"].shape[0], self.tensors["A"].shape[0]
        return tuple(self.tensors["D"].shape)

    @property
    def A(self) -> torch.Tensor:
        """The input covariance ``A = E[a aᵀ]`` (rebuilt as ``U_A Λ_A U_Aᵀ`` for EK-FAC)."""
        if self.estimator == "kfac":
            return self.tensors["A"]
        return _from_eigen(self.tensors["U_A"], self.tensors["lambda_A"])

    @property
    def G(self) -> torch.Tensor:
        """The output-gradient covariance ``G = E[g gᵀ]`` (rebuilt as ``U_G Λ_G U_Gᵀ`` for EK-FAC)."""
        if self.estimator == "kfac":
            return self.tensors["G"]
        return _from_eigen(self.tensors["U_G"], self.tensors["lambda_G"])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> LayerCurvature:
        return LayerCurvature(self.estimator, {k: t.to(device=device, dtype=dtype) for k, t in self.tensors.items()})


def _from_eigen(vectors: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return (vectors * values) @ vectors.T


@dataclass(frozen=True)
class CurvatureFactors:
    """The curvature of a base model at θ0: one :class:`LayerCurvature` per target linear module.

    Attributes:
        layers: module name (as in the base transformers model, e.g. ``model.layers.0.self_attn.q_proj``; the same
            name a PEFT LoRA layer has inside ``PeftModel.get_base_model()``) → factors.
        metadata: how the factors were made: estimator, base model identity and weights hash, reference data
            fingerprint, sample and token counts, ``max_length``, storage dtype... (see ``docs/CURVATURE.md``).
    """

    layers: dict[str, LayerCurvature]
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError("CurvatureFactors needs at least one layer.")
        estimators = {layer.estimator for layer in self.layers.values()}
        if len(estimators) != 1:
            raise ValueError(f"All layers must use the same estimator, got {sorted(estimators)}.")

    @property
    def estimator(self) -> str:
        return next(iter(self.layers.values())).estimator

    @property
    def module_names(self) -> list[str]:
        return sorted(self.layers)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> CurvatureFactors:
        """Copy to a device / dtype (do it once before training: :func:`curvature_penalty` reuses matching tensors)."""
        layers = {name: layer.to(device, dtype) for name, layer in self.layers.items()}
        return dataclasses.replace(self, layers=layers)

    def select(self, module_names: Sequence[str]) -> CurvatureFactors:
        """The factors of a subset of modules; raises ``ValueError`` naming the modules the factors do not cover."""
        missing = sorted(set(module_names) - set(self.layers))
        if missing:
            raise ValueError(
                f"The curvature factors do not cover the target modules {missing} (they cover {self.module_names}); "
                "estimate them for these target modules."
            )
        return dataclasses.replace(self, layers={name: self.layers[name] for name in sorted(module_names)})

    def size_report(self) -> list[dict[str, Any]]:
        """Per-layer ``{module, d_out, d_in, dtype, bytes}`` rows (the memory the factors take)."""
        return [
            {
                "module": name,
                "d_out": layer.shape[0],
                "d_in": layer.shape[1],
                "dtype": str(next(iter(layer.tensors.values())).dtype).removeprefix("torch."),
                "bytes": layer.nbytes,
            }
            for name, layer in sorted(self.layers.items())
        ]

    def format_size_report(self) -> str:
        rows = self.size_report()
        width = max(len(r["module"]) for r in rows)
        lines = [f"{'module':<{width}}  {'d_out':>6} {'d_in':>6} {'dtype':>8} {'MiB':>9}"]
        lines += [
            f"{r['module']:<{width}}  {r['d_out']:>6} {r['d_in']:>6} {r['dtype']:>8} {r['bytes'] / 2**20:>9.3f}"
            for r in rows
        ]
        lines.append(f"{self.estimator} factors, {len(rows)} layers, {sum(r['bytes'] for r in rows) / 2**20:.3f} MiB")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- pure maths


def kfac_penalty(
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float | torch.Tensor,
    A_cov: torch.Tensor,
    G_cov: torch.Tensor,
) -> torch.Tensor:
    """K-FAC quadratic form of a LoRA update, with only ``r × r`` work.

    ``R = vec(ΔW)ᵀ (A ⊗ G) vec(ΔW) = tr(G ΔW A ΔWᵀ) = s²·tr((Bᵀ G B)(A_l A A_lᵀ))`` for ``ΔW = s·B·A_l``
    (``vec`` stacks columns; with row-major flattening the Kronecker factors swap: ``G ⊗ A``).

    Args:
        lora_A: ``A_l``, shape ``(r, d_in)``.
        lora_B: ``B``, shape ``(d_out, r)``.
        scaling: the LoRA scaling ``s``.
        A_cov: the symmetric input covariance ``A``, ``(d_in, d_in)``.
        G_cov: the symmetric output-gradient covariance ``G``, ``(d_out, d_out)``.

    Returns:
        A 0-d tensor, differentiable with respect to ``lora_A`` and ``lora_B``.
    """
    inner_g = lora_B.T @ G_cov @ lora_B  # (r, r)
    inner_a = lora_A @ A_cov @ lora_A.T  # (r, r)
    # tr(XY) with both symmetric is the sum of their elementwise product
    return scaling**2 * (inner_g * inner_a).sum()


def ekfac_penalty(
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float | torch.Tensor,
    U_A: torch.Tensor,
    U_G: torch.Tensor,
    D: torch.Tensor,
) -> torch.Tensor:
    """EK-FAC quadratic form of a LoRA update: ``R = Σ_ij D_ij · (U_Gᵀ ΔW U_A)²_ij`` with ``ΔW = s·B·A_l``.

    The rotated update is formed from its factors, ``U_Gᵀ ΔW U_A = s·(U_Gᵀ B)(A_l U_A)``: ``ΔW`` itself is never built
    in the original basis.

    Args:
        lora_A: ``A_l``, shape ``(r, d_in)``.
        lora_B: ``B``, shape ``(d_out, r)``.
        scaling: the LoRA scaling ``s``.
        U_A: eigenvectors (columns) of the input covariance, ``(d_in, d_in)``.
        U_G: eigenvectors (columns) of the output-gradient covariance, ``(d_out, d_out)``.
        D: the eigenvalue correction ``E_n[(U_Gᵀ ∇W_n U_A)²]``, ``(d_out, d_in)``.

    Returns:
        A 0-d tensor, differentiable with respect to ``lora_A`` and ``lora_B``.
    """
    rotated = scaling * ((U_G.T @ lora_B) @ (lora_A @ U_A))  # (d_out, d_in)
    return (D * rotated.square()).sum()


def layer_penalty(
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float | torch.Tensor,
    factors: LayerCurvature,
) -> torch.Tensor:
    """:func:`kfac_penalty` or :func:`ekfac_penalty` according to ``factors.estimator``."""
    t = factors.tensors
    if factors.estimator == "kfac":
        return kfac_penalty(lora_A, lora_B, scaling, t["A"], t["G"])
    return ekfac_penalty(lora_A, lora_B, scaling, t["U_A"], t["U_G"], t["D"])


# --------------------------------------------------------------------------------------------------- model side


def base_model_of(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a ``PeftModel`` (or ``model`` itself): module names are relative to it."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def resolve_target_modules(
    model: torch.nn.Module, target_modules: LoraConfig | Sequence[str] | str | None = None
) -> list[str]:
    """Full names of the target linear modules inside :func:`base_model_of` ``(model)``.

    Args:
        model: a transformers model or a ``PeftModel``.
        target_modules: a ``LoraConfig`` (its ``target_modules``), a list of module names or name suffixes (``q_proj``
            matches every ``….q_proj``), a regex string (PEFT's full-match convention), ``"all-linear"`` (every
            ``nn.Linear`` but the output embeddings), or ``None`` to take the LoRA layers of a ``PeftModel``.

    Raises:
        ValueError: a target that matches no module, a matched module that is not a linear layer, or ``None`` with a
            model that has no LoRA layer.
    """
    base = base_model_of(model)
    if isinstance(target_modules, LoraConfig):
        target_modules = target_modules.target_modules
        if target_modules is None:
            raise ValueError("The LoraConfig has no target_modules; set them (e.g. ['q_proj', 'v_proj']).")
    names: list[str]
    if target_modules is None:
        names = [name for name, module in base.named_modules() if isinstance(module, LoraLayer)]
        if not names:
            raise ValueError("The model has no LoRA layer: pass target_modules (a LoraConfig or module names).")
    elif isinstance(target_modules, str) and target_modules == "all-linear":
        output = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
        names = [n for n, m in base.named_modules() if _is_linear(m) and m is not output and not _inside_lora(n, base)]
    elif isinstance(target_modules, str):
        import re

        names = [n for n, m in base.named_modules() if re.fullmatch(target_modules, n) and not _inside_lora(n, base)]
        if not names:
            raise ValueError(f"The target-module regex {target_modules!r} matches no module of the model.")
    else:
        candidates = [n for n, _ in base.named_modules() if n and not _inside_lora(n, base)]
        names, unknown = [], []
        for target in target_modules:
            matched = [n for n in candidates if n == target or n.endswith("." + target)]
            if not matched:
                unknown.append(target)
            names.extend(matched)
        if unknown:
            raise ValueError(f"The target modules {unknown} match no module of the model (e.g. 'q_proj', 'v_proj').")
    modules = dict(base.named_modules())
    not_linear = [n for n in names if not _is_linear(modules[n])]
    if not_linear:
        raise ValueError(
            f"Curvature factors are defined for linear layers only; {not_linear[:5]} are "
            f"{sorted({type(modules[n]).__name__ for n in not_linear})}."
        )
    return sorted(set(names))


def _inside_lora(name: str, base: torch.nn.Module) -> bool:
    # the LoRA layer's own sub-modules (base_layer, lora_A.default...) are not targets
    parts = name.split(".")
    return any(p in ("base_layer", "lora_A", "lora_B", "lora_dropout", "lora_embedding_A") for p in parts)


def _is_linear(module: torch.nn.Module) -> bool:
    if isinstance(module, LoraLayer):
        return isinstance(module.get_base_layer(), torch.nn.Linear)
    return isinstance(module, torch.nn.Linear)


def linear_base_layer(module: torch.nn.Module, name: str) -> torch.nn.Linear:
    """The ``nn.Linear`` holding θ0's weight: the ``base_layer`` of a LoRA layer, or the module itself."""
    if isinstance(module, LoraLayer):
        if getattr(module, "fan_in_fan_out", False):
            raise ValueError(
                f"{name} uses fan_in_fan_out=True (a Conv1D-style weight), which the curvature code does not support."
            )
        module = module.get_base_layer()
    if not isinstance(module, torch.nn.Linear):
        raise ValueError(f"{name} is a {type(module).__name__}; curvature factors need an nn.Linear.")
    return module


def curvature_penalty(model: torch.nn.Module, factors: CurvatureFactors, adapter_name: str) -> torch.Tensor:
    """``R(τ) = Σ_layers R_l`` for one LoRA adapter, differentiable with respect to its ``lora_A`` / ``lora_B``.

    ``R_l`` is :func:`ekfac_penalty` or :func:`kfac_penalty` of the layer's ``ΔW = s·B·A_l``, where ``s`` is the
    adapter's nominal scaling (:func:`delta_trl.core.adapters.nominal_scaling`): the task vector PEFT saves, whatever
    scale a running pass has set (α for the student, 0 for the parked teacher).

    Args:
        model: a ``PeftModel`` (or the model under it) carrying the adapter.
        factors: θ0's factors; they must cover every layer of the adapter (extra layers are allowed and unused). The
            maths runs in float32 on the LoRA weights' device: move the factors there once with
            ``factors.to(device, torch.float32)`` to avoid a copy per call.
        adapter_name: the LoRA adapter whose update is penalised.

    Returns:
        A 0-d float32 tensor.

    Raises:
        ValueError: the adapter has no LoRA layer or is not vanilla LoRA (DoRA...), a layer that is not an ``nn.Linear`` (or uses ``fan_in_fan_out``), or
            a layer the factors do not cover or whose shape differs.
    """
    check_linear_lora(model, adapter_name)  # DoRA and other variants are not s·B·A_l: the formulas would be wrong
    base = base_model_of(model)
    layers = {name: module for name, module in base.named_modules() if isinstance(module, LoraLayer)}
    layers = {name: module for name, module in layers.items() if adapter_name in module.scaling}
    if len(layers) != len(lora_layers(model, adapter_name)):
        raise ValueError("Some LoRA layers are outside the base model; pass the PeftModel or its base model.")
    for name, layer in layers.items():
        linear_base_layer(layer, name)  # refuse fan-in-fan-out and non-linear layers before anything else
    missing = sorted(set(layers) - set(factors.layers))
    if missing:
        raise ValueError(
            f"The curvature factors do not cover the LoRA layers {missing[:5]}{'…' if len(missing) > 5 else ''} of "
            f"adapter {adapter_name!r}; estimate the factors for the adapter's target modules."
        )
    total = None
    for name, layer in sorted(layers.items()):
        weight_a = layer.lora_A[adapter_name].weight
        weight_b = layer.lora_B[adapter_name].weight
        layer_factors = factors.layers[name]
        if layer_factors.shape != (weight_b.shape[0], weight_a.shape[1]):
            raise ValueError(
                f"{name}: the curvature factors are for a {layer_factors.shape} weight but the layer is "
                f"{(weight_b.shape[0], weight_a.shape[1])}; they belong to another model."
            )
        layer_factors = layer_factors.to(weight_a.device, torch.float32)
        value = layer_penalty(weight_a.float(), weight_b.float(), nominal_scaling(layer, adapter_name), layer_factors)
        total = value if total is None else total + value
    return total


def check_finite(tensors: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise ``ValueError`` naming the first tensor with a NaN or an infinity."""
    for name, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise ValueError(
                f"The {what} {name!r} has non-finite values (NaN or inf): the model overflowed on the reference data "
                "(try float32 weights or shorter max_length). Nothing was written."
            )
