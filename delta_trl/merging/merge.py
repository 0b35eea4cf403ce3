"""Exact task arithmetic on LoRA adapters, in effective-weight space (docs/METHOD.md §5).

A LoRA adapter ``t`` with scaling ``s_t`` (``lora_alpha/r``, rsLoRA ``lora_alpha/√r``, per module with
``rank_pattern``/``alpha_pattern``) defines the task vector ``τ_t = {ΔW_t = s_t·B_t·A_t}`` per target module.
Task addition and negation give ``θ = θ0 + Σ_t α_t·τ_t`` (``α_t < 0`` negates). Two exact outputs:

- one standard PEFT LoRA adapter of rank ``Σ_t r_t`` with the coefficients folded into ``B``::

      B = [α_1·s_1·B_1 | α_2·s_2·B_2 | …],   A = [A_1; A_2; …],   lora_alpha = r = Σ_t r_t  (scaling 1)

  so ``B·A = Σ_t α_t·s_t·B_t·A_t``; it loads with stock ``PeftModel.from_pretrained``;
- the base model with ``Σ_t α_t·ΔW_t`` added to its weights (``--fold-into-base``).

PEFT's ``add_weighted_adapter(combination_type="linear")`` mixes ``A`` and ``B`` separately and is *not* task
arithmetic (cross terms, peft#3004); it is never used here. TIES and DARE (:mod:`delta_trl.merging.methods`) work on the
dense ``ΔW_t`` and are written either folded or re-factored to rank ``Σ_t r_t`` by SVD, with the truncation error
reported in ``merge_report.json``.

Everything is validated by :func:`_check_merge_inputs` before anything is written, and the output folder appears
atomically (:func:`delta_trl._utils.atomic_output_dir`). The base model is identified by the content hash each adapter
records in ``delta_trl.json`` (``base_model_sha256``, :func:`delta_trl.core.fingerprint.base_model_fingerprint`); names
are for display. Adapters trained in ``linear`` mode (``"evaluate_linearized": true``) act through the linearized
model ``f(θ0) + J·τ``: their merged adapter keeps the marker, and they can be neither folded into the weights nor
mixed with ordinary adapters.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from safetensors.torch import save_file

from delta_trl._utils import atomic_output_dir, check_output_dir, write_json
from delta_trl.core.fingerprint import DTYPE_KEY, FINGERPRINT_KEY, base_model_dtype, base_model_fingerprint
from delta_trl.merging.adapter_io import LoadedAdapter, load_adapter, load_base_model
from delta_trl.merging.methods import MergeMethod, check_density, combine_with_method, low_rank_factors


MERGE_REPORT = "merge_report.json"
DELTA_METADATA = "delta_trl.json"
LINEARIZED_KEY = "evaluate_linearized"


@dataclass(frozen=True)
class MergePlan:
    """Everything :func:`merge_adapters` needs, resolved and validated; nothing has been written yet."""

    adapters: list[LoadedAdapter]
    coefficients: list[float]
    method: MergeMethod
    density: float
    output_dir: Path
    overwrite: bool
    fold_into_base: bool
    base_model: torch.nn.Module | None
    modules: list[str]
    seed: int
    evaluate_linearized: bool = False
    base_model_sha256: str | None = None


@dataclass(frozen=True)
class MergeResult:
    """Where the merge was written and what ``merge_report.json`` says."""

    output_dir: Path
    report: dict[str, Any] = field(default_factory=dict)


def _check_merge_inputs(
    adapters: Sequence[str | os.PathLike | LoadedAdapter],
    coefficients: Sequence[float] | None,
    output_dir: str | os.PathLike,
    *,
    method: MergeMethod | str = MergeMethod.TASK_ARITHMETIC,
    density: float = 1.0,
    fold_into_base: bool = False,
    base_model: torch.nn.Module | str | None = None,
    overwrite: bool = False,
    seed: int = 0,
) -> MergePlan:
    """Load and validate every input of a merge; raise ``ValueError``/``FileNotFoundError`` on the first problem.

    Checks: at least one adapter; one finite coefficient per adapter; a known method and ``0 < density <= 1``;
    every adapter a vanilla (rs)LoRA on linear layers (see :func:`delta_trl.merging.adapter_io.load_adapter`); one training
    mode (all ``linear``/linearized or none, see :func:`_check_linearized`); one base model, by the recorded
    ``base_model_sha256`` (:func:`_recorded_fingerprint`; by ``base_model_name_or_path`` for adapters that record no
    hash); the same ``fan_in_fan_out`` and target modules with the same shapes across adapters; the base model (needed
    for ``fold_into_base``) has every target weight with a matching shape and, when the adapters record a hash, that
    content hash; the output folder does not exist (unless ``overwrite``) and is not one of the input folders.
    """
    if not adapters:
        raise ValueError("Give at least one adapter to merge.")
    try:
        method = MergeMethod(method)
    except ValueError as err:
        choices = [m.value for m in MergeMethod]
        raise ValueError(f"Unknown merge method {method!r}; choose one of {choices}.") from err
    check_density(density)
    if method is MergeMethod.TASK_ARITHMETIC and density != 1.0:
        raise ValueError("density only applies to the ties and dare methods; task_arithmetic keeps every entry.")
    coefficients = [1.0] * len(adapters) if coefficients is None else [float(c) for c in coefficients]
    if len(coefficients) != len(adapters):
        raise ValueError(f"Got {len(adapters)} adapters but {len(coefficients)} coefficients; give one per adapter.")
    bad = [c for c in coefficients if not math.isfinite(c)]
    if bad:
        raise ValueError(f"Coefficients must be finite numbers; got {coefficients}.")
    loaded = [a if isinstance(a, LoadedAdapter) else load_adapter(a) for a in adapters]
    linearized = _check_linearized(loaded, fold_into_base)
    fingerprint = _recorded_fingerprint(loaded)
    every_hash = all(a.metadata.get(FINGERPRINT_KEY) for a in loaded)
    first = loaded[0]
    for other in loaded[1:]:
        _check_compatible(first, other, compare_names=not every_hash)
    output_dir = check_output_dir(output_dir, overwrite)
    for adapter in loaded:
        if adapter.path.resolve() == output_dir.resolve():
            raise ValueError(f"The output folder {str(output_dir)!r} is one of the input adapters; choose another.")
    if isinstance(base_model, str | os.PathLike):
        dtypes = {a.metadata.get(DTYPE_KEY) for a in loaded}
        base_model = load_base_model(base_model, dtype=dtypes.pop() if len(dtypes) == 1 else None)
    if fold_into_base and base_model is None:
        raise ValueError("fold_into_base=True needs the base model (a model instance or a folder / hub id).")
    if base_model is not None:
        _check_base_shapes(base_model, first)
        if fingerprint is not None:
            _check_base_fingerprint(base_model, fingerprint, first)
    return MergePlan(
        adapters=loaded,
        coefficients=coefficients,
        method=method,
        density=density,
        output_dir=output_dir,
        overwrite=overwrite,
        fold_into_base=fold_into_base,
        base_model=base_model,
        modules=sorted(first.modules),
        seed=seed,
        evaluate_linearized=linearized,
        base_model_sha256=fingerprint if every_hash else None,
    )


def is_linearized(adapter: LoadedAdapter) -> bool:
    """Whether the adapter's ``delta_trl.json`` says ``"evaluate_linearized": true`` (trained in ``linear`` mode)."""
    return bool(adapter.metadata.get(LINEARIZED_KEY, False))


def _check_linearized(adapters: Sequence[LoadedAdapter], fold_into_base: bool) -> bool:
    """Whether all adapters are linearized; raise if only some are, or if linearized ones are to be folded.

    A linearized task vector acts through ``f(θ0) + J·τ``; an ordinary one through ``f(θ0 + τ)``. A sum of both kinds
    is neither model, and weights ``θ0 + τ`` folded into a checkpoint can only be evaluated as ``f(θ0 + τ)``.
    """
    flags = {a.source: is_linearized(a) for a in adapters}
    if len(set(flags.values())) > 1:
        linear = [s for s, f in flags.items() if f]
        plain = [s for s, f in flags.items() if not f]
        raise ValueError(
            f"Cannot merge adapters evaluated linearized (`linear` mode: {linear}) with ordinary ones ({plain}): "
            "f(θ0) + J·τ1 plus f(θ0 + τ2) is neither model. Merge adapters of one training mode."
        )
    linearized = next(iter(flags.values()))
    if linearized and fold_into_base:
        raise ValueError(
            f"The adapters {list(flags)} were trained in `linear` mode and are evaluated as f(θ0) + J·τ, which folded "
            "weights θ0 + τ cannot express. Write a merged adapter instead (no fold_into_base / --fold-into-base); "
            "it keeps the evaluate_linearized marker."
        )
    return linearized


def _recorded_fingerprint(adapters: Sequence[LoadedAdapter]) -> str | None:
    """The ``base_model_sha256`` the adapters record (``None`` if none does); raise if two record different ones."""
    recorded = [(a.source, a.metadata[FINGERPRINT_KEY]) for a in adapters if a.metadata.get(FINGERPRINT_KEY)]
    if not recorded:
        return None
    source, value = recorded[0]
    other = next(((s, v) for s, v in recorded if v != value), None)
    if other is not None:
        raise ValueError(
            f"The adapters were trained on different base models: {source!r} records base_model_sha256 "
            f"{value[:12]}… and {other[0]!r} {other[1][:12]}… (a content hash of all θ0 weights). Task vectors only "
            "add up on the same θ0; retrain one of them on the other's base model."
        )
    return value


def _check_base_fingerprint(model: torch.nn.Module, recorded: str, adapter: LoadedAdapter) -> None:
    """Raise unless the base model's content hash is the one the adapters were trained on."""
    actual = base_model_fingerprint(model)
    if actual != recorded:
        trained = adapter.metadata.get(DTYPE_KEY)
        dtype = f" in {base_model_dtype(model)}" + (f", trained in {trained}" if trained else "")
        raise ValueError(
            f"The base model is not the one the adapters were trained on: the sha256 of all its weights{dtype} is "
            f"{actual[:12]}…, the adapters record {recorded[:12]}… ({adapter.config.base_model_name_or_path!r}). "
            "Load the checkpoint, revision and dtype used for training."
        )


def _check_compatible(first: LoadedAdapter, other: LoadedAdapter, compare_names: bool = True) -> None:
    """Raise unless ``other`` targets the same modules and shapes as ``first`` (and, by name, base model).

    ``compare_names=False`` when the adapters record their base model's content hash, which was compared already.
    """
    base_a, base_b = first.config.base_model_name_or_path, other.config.base_model_name_or_path
    if compare_names and base_a != base_b:
        raise ValueError(
            f"The adapters were trained on different base models: {first.source!r} on {base_a!r} and "
            f"{other.source!r} on {base_b!r}. Task vectors only add up on the same θ0; if these are the same model "
            "under two names, set `base_model_name_or_path` in their adapter_config.json to one value."
        )
    if first.config.fan_in_fan_out != other.config.fan_in_fan_out:
        raise ValueError(
            f"{first.source!r} and {other.source!r} disagree on fan_in_fan_out; adapters of one base model must agree."
        )
    if set(first.modules) != set(other.modules):
        only_a = sorted(set(first.modules) - set(other.modules))[:3]
        only_b = sorted(set(other.modules) - set(first.modules))[:3]
        raise ValueError(
            f"The adapters target different modules: only in {first.source!r}: {only_a}; only in {other.source!r}: "
            f"{only_b}. Train them with the same `target_modules` (and layers_to_transform)."
        )
    for name, module in first.modules.items():
        if module.shape != other.modules[name].shape:
            raise ValueError(
                f"Module {name!r} has ΔW shape {module.shape} in {first.source!r} but {other.modules[name].shape} "
                f"in {other.source!r}; the adapters do not belong to the same base model."
            )


def _check_base_shapes(model: torch.nn.Module, adapter: LoadedAdapter) -> None:
    """Raise unless every target module has a weight in ``model`` with the adapter's shape."""
    params = dict(model.named_parameters())
    for name, module in adapter.modules.items():
        key = f"{_module_path(name)}.weight"
        weight = params.get(key)
        expected = module.shape[::-1] if adapter.config.fan_in_fan_out else module.shape
        if weight is None:
            raise ValueError(
                f"The base model has no weight {key!r}, targeted by {adapter.source!r}; it is not the "
                f"model the adapter was trained on ({adapter.config.base_model_name_or_path!r})."
            )
        if tuple(weight.shape) != tuple(expected):
            raise ValueError(
                f"Shape mismatch for {key!r}: base model weight {tuple(weight.shape)}, adapter ΔW {expected}; it is "
                f"not the model the adapter was trained on ({adapter.config.base_model_name_or_path!r})."
            )


def merged_deltas(plan: MergePlan) -> dict[str, torch.Tensor]:
    """Dense merged update per module, ``(out, in)`` layout, float32: ``combine_with_method`` of the ``ΔW_t``.

    For ``task_arithmetic`` this is exactly ``Σ_t α_t·s_t·B_t·A_t``.
    """
    generator = torch.Generator().manual_seed(plan.seed)
    return {
        name: combine_with_method(
            [a.modules[name].delta() for a in plan.adapters],
            plan.coefficients,
            plan.method,
            density=plan.density,
            generator=generator,
        )
        for name in plan.modules
    }


def concatenate_adapters(
    adapters: Sequence[LoadedAdapter], coefficients: Sequence[float]
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Exact task-arithmetic adapter: ``B = [α_1 s_1 B_1 | …]``, ``A = [A_1; …]`` per module.

    Returns:
        The PEFT state dict (``<module>.lora_A.weight``/``.lora_B.weight``, float32) and the rank ``Σ_t r_t`` of
        each module.
    """
    state: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for name in adapters[0].modules:
        parts = [(a.modules[name], c) for a, c in zip(adapters, coefficients, strict=True)]
        state[f"{name}.lora_A.weight"] = torch.cat([m.lora_A.float() for m, _ in parts], dim=0)
        state[f"{name}.lora_B.weight"] = torch.cat([c * m.scaling * m.lora_B.float() for m, c in parts], dim=1)
        ranks[name] = sum(m.rank for m, _ in parts)
    return state, ranks


def _refactored_adapter(
    deltas: dict[str, torch.Tensor], ranks: dict[str, int]
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Re-factor dense merged updates to the given ranks by truncated SVD; also return the relative errors."""
    state: dict[str, torch.Tensor] = {}
    errors: dict[str, float] = {}
    for name, delta in deltas.items():
        b, a, errors[name] = low_rank_factors(delta, ranks[name])
        state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"] = a, b
    return state, errors


def _merged_config(template: LoraConfig, ranks: dict[str, int]) -> LoraConfig:
    """LoRA config of the merged adapter: scaling 1 on every module (``lora_alpha = r``), no rsLoRA.

    The most common rank becomes ``r``; modules with another rank get ``rank_pattern``/``alpha_pattern`` entries with
    the same value, so PEFT computes ``scaling = alpha/r = 1`` everywhere.
    """
    counts: dict[int, int] = {}
    for rank in ranks.values():
        counts[rank] = counts.get(rank, 0) + 1
    r = max(counts, key=lambda k: (counts[k], k))
    # Full module names as pattern keys: PEFT matches them with `(.*\.)?<key>$`, so they select exactly one module.
    pattern = {_module_path(name): rank for name, rank in ranks.items() if rank != r}
    return dataclasses.replace(
        template,
        r=r,
        lora_alpha=r,
        use_rslora=False,
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        inference_mode=True,
        init_lora_weights=True,
    )


def _module_path(name: str) -> str:
    """Module path inside the base model (``model.layers.0.self_attn.q_proj``) from a PEFT state-dict prefix."""
    return name.removeprefix("base_model.model.")


def _finite_or_raise(tensors: dict[str, torch.Tensor], what: str) -> None:
    bad = [name for name, tensor in tensors.items() if not torch.isfinite(tensor).all()]
    if bad:
        raise ValueError(
            f"The {what} has non-finite values in {bad[:3]} ({len(bad)} tensors); nothing was written. Check the "
            "adapters' weights and the coefficients (overflow in half precision?)."
        )


def fold_into_model(model: torch.nn.Module, deltas: dict[str, torch.Tensor], fan_in_fan_out: bool = False) -> None:
    """Add the dense updates to the model's weights in place: ``W ← W + ΔW`` (``ΔWᵀ`` for ``fan_in_fan_out``).

    ``deltas`` are keyed by PEFT state-dict module prefix (``base_model.model.<path>``) or module path. All new weights
    are computed and checked finite before any is assigned.
    """
    params = dict(model.named_parameters())
    new: dict[str, torch.Tensor] = {}
    for name, delta in deltas.items():
        key = f"{_module_path(name)}.weight"
        if key not in params:
            raise ValueError(f"The model has no weight {key!r} to fold the task vector into.")
        weight = params[key]
        update = delta.T if fan_in_fan_out else delta
        if tuple(update.shape) != tuple(weight.shape):
            raise ValueError(f"ΔW for {key!r} has shape {tuple(update.shape)}, the weight {tuple(weight.shape)}.")
        new[key] = (weight.detach().float() + update.float()).to(weight.dtype)
    _finite_or_raise(new, "folded model")
    with torch.no_grad():
        for key, value in new.items():
            params[key].copy_(value)


def merge_adapters(
    adapters: Sequence[str | os.PathLike | LoadedAdapter],
    coefficients: Sequence[float] | None,
    output_dir: str | os.PathLike,
    *,
    method: MergeMethod | str = MergeMethod.TASK_ARITHMETIC,
    density: float = 1.0,
    fold_into_base: bool = False,
    base_model: torch.nn.Module | str | None = None,
    overwrite: bool = False,
    seed: int = 0,
) -> MergeResult:
    """Merge LoRA task vectors ``θ0 + Σ_t α_t·τ_t`` and write a PEFT adapter or a full model to ``output_dir``.

    Args:
        adapters: adapter folders, hub ids or :class:`~delta_trl.merging.adapter_io.LoadedAdapter`.
        coefficients: ``α_t`` per adapter (negative = negation); ``None`` means all 1.
        output_dir: new folder to write (never overwritten unless ``overwrite=True``; written atomically).
        method: ``task_arithmetic`` (exact), ``ties`` or ``dare`` (baselines on the dense ``ΔW_t``).
        density: fraction of entries kept by ``ties``/``dare``.
        fold_into_base: write the base model with the merged update in its weights (``save_pretrained``) instead of
            an adapter. Needs ``base_model``.
        base_model: model instance or folder/hub id; when given, its weight shapes are checked against the adapters.
            An instance is left unchanged.
        overwrite: replace an existing ``output_dir``.
        seed: seed of DARE's random masks.

    Returns:
        :class:`MergeResult` with the folder and the report also written to ``merge_report.json`` (method,
        adapters, coefficients, ranks, and for SVD re-factoring the per-module relative truncation error
        ``‖ΔW − B·A‖_F/‖ΔW‖_F``).
    """
    plan = _check_merge_inputs(
        adapters,
        coefficients,
        output_dir,
        method=method,
        density=density,
        fold_into_base=fold_into_base,
        base_model=base_model,
        overwrite=overwrite,
        seed=seed,
    )
    return _write_merge(plan)


def _write_merge(plan: MergePlan) -> MergeResult:
    first = plan.adapters[0]
    report: dict[str, Any] = {
        "method": plan.method.value,
        "base_model": first.config.base_model_name_or_path,
        "task_vectors": [
            # `name` is what a model card shows: a hub id, or the folder name rather than a local absolute path.
            {
                "name": a.path.name if Path(a.source).is_dir() else a.source,
                "source": a.source,
                "coefficient": c,
                "delta_trl": a.metadata,
            }
            for a, c in zip(plan.adapters, plan.coefficients, strict=True)
        ],
        "output": "model" if plan.fold_into_base else "adapter",
        FINGERPRINT_KEY: plan.base_model_sha256,
        LINEARIZED_KEY: plan.evaluate_linearized,
    }
    if plan.method is not MergeMethod.TASK_ARITHMETIC:
        report["density"] = plan.density
        report["seed"] = plan.seed
    if plan.fold_into_base:
        _write_folded(plan, report)
    else:
        _write_adapter(plan, report)
    return MergeResult(plan.output_dir, report)


def _write_folded(plan: MergePlan, report: dict[str, Any]) -> None:
    """Fold the merged update into the base model, ``save_pretrained`` it, and restore the caller's weights."""
    deltas = merged_deltas(plan)
    _finite_or_raise(deltas, "merged update")
    model = plan.base_model
    params = dict(model.named_parameters())
    # Only the target weights change; keep copies of those to hand the caller's instance back unchanged.
    originals = {key: params[key].detach().clone() for key in (f"{_module_path(n)}.weight" for n in deltas)}
    try:
        fold_into_model(model, deltas, plan.adapters[0].config.fan_in_fan_out)
        with atomic_output_dir(plan.output_dir, plan.overwrite) as tmp:
            model.save_pretrained(tmp)
            write_json(tmp / MERGE_REPORT, report)
    finally:
        with torch.no_grad():
            for key, value in originals.items():
                params[key].copy_(value)


def _write_adapter(plan: MergePlan, report: dict[str, Any]) -> None:
    """Write the merged LoRA adapter: exact concatenation, or SVD re-factoring for TIES/DARE."""
    first = plan.adapters[0]
    if plan.method is MergeMethod.TASK_ARITHMETIC:
        state, ranks = concatenate_adapters(plan.adapters, plan.coefficients)
    else:
        ranks = {name: sum(a.modules[name].rank for a in plan.adapters) for name in plan.modules}
        state, errors = _refactored_adapter(merged_deltas(plan), ranks)
        report["svd_relative_error"] = {"max": max(errors.values()), "per_module": errors}
    report["ranks"] = ranks
    # Check after the cast: α·s·B can overflow a half-precision adapter dtype.
    state = {k: v.to(first.dtype).contiguous() for k, v in state.items()}
    _finite_or_raise(state, "merged adapter")
    config = _merged_config(first.config, ranks)
    with atomic_output_dir(plan.output_dir, plan.overwrite) as tmp:
        save_file(state, tmp / "adapter_model.safetensors", {"format": "pt"})
        config.save_pretrained(tmp)
        write_json(tmp / MERGE_REPORT, report)
        write_json(tmp / DELTA_METADATA, merged_metadata(plan))


def merged_metadata(plan: MergePlan) -> dict[str, Any]:
    """The merged adapter's ``delta_trl.json``: what evaluation and further merges read from an adapter.

    ``evaluate_linearized`` (all inputs are linearized), ``base_model_sha256`` (when every input records it) and
    ``delta_mode`` (when every input records the same one), plus the merge method and the delta_trl version.
    """
    from delta_trl import __version__

    modes = {a.metadata.get("delta_mode") for a in plan.adapters}
    metadata: dict[str, Any] = {"delta_trl_version": __version__, "merge_method": plan.method.value}
    if len(modes) == 1 and None not in modes:
        metadata["delta_mode"] = modes.pop()
    metadata[LINEARIZED_KEY] = plan.evaluate_linearized
    if plan.base_model_sha256 is not None:
        metadata[FINGERPRINT_KEY] = plan.base_model_sha256
    return metadata
