"""LoRA adapter plumbing shared by the trainers, the linearized teacher and merging.

Everything here works in *effective-weight* space: a LoRA module with scaling ``s`` contributes ``ΔW = s·B·A``, and
the only knob DELTA turns is ``s``. Setting the scale of every :class:`peft.tuners.lora.LoraLayer` of an adapter
to ``c`` times its nominal value (PEFT's ``set_scale``) therefore moves the model to ``θ0 + c·τ`` exactly, for any
LoRA flavour whose contribution is linear in ``s`` (vanilla LoRA and rsLoRA; not DoRA or other ``lora_variant``).
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator, Mapping

import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora import LoraLayer


def lora_layers(model: torch.nn.Module, adapter_name: str | None = None) -> list[LoraLayer]:
    """All LoRA layers of ``model`` (optionally only those that carry ``adapter_name``)."""
    return [
        module
        for module in model.modules()
        if isinstance(module, LoraLayer) and (adapter_name is None or adapter_name in module.scaling)
    ]


def check_linear_lora_config(config: object, what: str) -> None:
    """Raise unless ``config`` is a ``LoraConfig`` without DoRA (see :func:`check_linear_lora`)."""
    if not isinstance(config, LoraConfig):
        raise ValueError(f"{what} is a {type(config).__name__}; DELTA needs a LoRA adapter (peft.LoraConfig).")
    if getattr(config, "use_dora", False):
        raise ValueError(
            f"{what} uses DoRA, whose update is not linear in the LoRA scaling; DELTA's linearization, "
            "α-interpolation and exact merging need vanilla LoRA (rsLoRA is fine). Set use_dora=False."
        )


def check_linear_lora(model: torch.nn.Module, adapter_name: str) -> None:
    """Raise unless ``adapter_name`` is a LoRA adapter whose output is linear in its scaling.

    DoRA and the other PEFT ``lora_variant`` implementations rescale or normalise the update, so
    ``f(θ0 + c·τ)`` is not obtained by multiplying ``scaling`` by ``c`` and the ε-trick of the teacher, the α
    interpolation of the student and exact merging would all be wrong.
    """
    if isinstance(model, PeftModel):
        config = model.peft_config.get(adapter_name)
        if config is None:
            raise ValueError(f"The model has no adapter named {adapter_name!r}; it has {sorted(model.peft_config)}.")
        check_linear_lora_config(config, f"Adapter {adapter_name!r}")
    layers = lora_layers(model, adapter_name)
    if not layers:
        raise ValueError(f"No LoRA layer carries the adapter {adapter_name!r}.")
    for layer in layers:
        variant = getattr(layer, "lora_variant", {}).get(adapter_name)
        if variant is not None:
            raise ValueError(
                f"Adapter {adapter_name!r} uses the LoRA variant {type(variant).__name__} on "
                f"{type(layer).__name__}, which is not linear in the LoRA scaling; use vanilla LoRA (or rsLoRA)."
            )


def nominal_scaling(layer: LoraLayer, adapter_name: str) -> float:
    """The scaling ``s`` the adapter's config gives it (``lora_alpha/r``, rsLoRA ``lora_alpha/√r``).

    This is the ``s`` of the task vector ``τ = s·B·A`` that PEFT saves and reloads, whatever a running pass has set
    the layer's live scaling to (α, ε, parked). ``LoraLayer.set_scale(name, 1.0)`` sets exactly this value (a test
    guards the two against drifting apart).
    """
    r = layer.r[adapter_name]
    return layer.lora_alpha[adapter_name] / (math.sqrt(r) if layer.use_rslora.get(adapter_name, False) else r)


def scale_multiplier(layer: LoraLayer, adapter_name: str) -> float | torch.Tensor:
    """The factor ``c`` by which the adapter's live scaling differs from its nominal one (1 when untouched)."""
    return layer.scaling[adapter_name] / nominal_scaling(layer, adapter_name)


@contextlib.contextmanager
def scaled_adapters(model: torch.nn.Module, factors: Mapping[str, float | torch.Tensor]) -> Iterator[None]:
    """Multiply the LoRA scaling of each named adapter by a factor (a float or a 0-d tensor) inside the block.

    With factors ``{student: α, teacher: 0}`` the network computes ``f(x; θ0 + α·τ_S)``; with ``{teacher: ε}`` where
    ``ε`` is a forward-mode dual number, the tangent of the output is ``J f(x; θ0)·τ_T`` (the ε-trick). Scales go
    through PEFT's own ``LoraLayer.set_scale`` (which accepts a tensor factor) rather than by editing ``scaling``.
    Adapters are never toggled (PEFT's ``disable_adapter``/``set_adapter`` flip ``requires_grad``, which breaks
    inside ``torch.func`` transforms), so this is safe inside ``torch.func.jvp`` and leaves ``requires_grad`` alone.
    The previous multipliers are restored on exit, also on error.
    """
    saved: list[tuple[LoraLayer, str, float | torch.Tensor]] = []
    try:
        for name, factor in factors.items():
            for layer in lora_layers(model, name):
                multiplier = scale_multiplier(layer, name)
                saved.append((layer, name, multiplier))
                layer.set_scale(name, multiplier * factor)
        yield
    finally:
        for layer, name, multiplier in reversed(saved):
            layer.set_scale(name, multiplier)


@contextlib.contextmanager
def only_adapter(model: torch.nn.Module, adapter_name: str) -> Iterator[None]:
    """Inside the block every LoRA layer runs the branch of ``adapter_name`` alone (PEFT's layer-level
    ``set_adapter``).

    For passes in which every other adapter is scaled to 0: PEFT would still run their branches and add
    ``(B·A·x)·0 = 0`` (bit-identical to skipping them for finite activations), which in the teacher's forward-mode
    pass costs a tangent and a graph per layer, ~3% of a DELTA step. ``set_adapter`` also switches ``requires_grad``
    (on for ``adapter_name``, off for the others): every layer's active adapters and every LoRA parameter's
    ``requires_grad`` are put back on exit, also on error. Not inside ``torch.func`` transforms, where flipping
    ``requires_grad`` breaks (:func:`scaled_adapters` is the way there).
    """
    saved = [
        (layer, list(layer.active_adapters), [(p, p.requires_grad) for p in layer.parameters()])
        for layer in lora_layers(model)
    ]
    try:
        for layer, _, _ in saved:
            layer.set_adapter([adapter_name])
        yield
    finally:
        for layer, active, flags in saved:
            layer.set_adapter(active)
            for param, requires_grad in flags:
                param.requires_grad_(requires_grad)


def add_teacher_adapter(model: PeftModel, student_name: str, teacher_name: str, teacher_r: int | None) -> LoraConfig:
    """Add the teacher LoRA adapter, built from the student's config, and make both adapters active and trainable.

    Both adapters stay active (and trainable) for the whole run, and the teacher is parked (:func:`park_adapter`),
    so every forward pass sees the student alone unless the teacher is explicitly unparked.
    ``PeftModel.active_adapter`` keeps naming the student, so PEFT's saving and the Trainer see the student as the
    model's adapter.
    """
    if teacher_name in model.peft_config:
        raise ValueError(
            f"The model already has an adapter named {teacher_name!r}; choose another `teacher_adapter_name`."
        )
    teacher_config = copy.deepcopy(model.peft_config[student_name])
    teacher_config.inference_mode = False
    if teacher_r is not None:
        teacher_config.r = teacher_r
    model.add_adapter(teacher_name, teacher_config)
    activate_student_and_teacher(model, student_name, teacher_name)
    return teacher_config


def activate_student_and_teacher(model: PeftModel, student_name: str, teacher_name: str) -> None:
    """Make both adapters active and trainable, the teacher parked; any other adapter (TRL's "ref") inactive.

    Also the repair after anything that calls ``set_adapter`` with the student alone (the Trainer's checkpoint
    loader does, for an adapter not named "default"), which would freeze the teacher.
    """
    model.base_model.set_adapter([student_name, teacher_name])
    park_adapter(model, teacher_name)


@contextlib.contextmanager
def unparked(model: torch.nn.Module, adapter_name: str) -> Iterator[None]:
    """Give a parked adapter (see :func:`park_adapter`) its nominal scaling back inside the block."""
    layers = lora_layers(model, adapter_name)
    try:
        for layer in layers:
            layer.set_scale(adapter_name, 1.0)
        yield
    finally:
        for layer in layers:
            layer.set_scale(adapter_name, 0.0)


def park_adapter(model: torch.nn.Module, adapter_name: str) -> None:
    """Keep an active, trainable adapter out of every forward pass by setting its scale to 0.

    The teacher is parked for the whole run, so generation, evaluation and any forward a user makes see the student
    alone; only the teacher pass (:func:`unparked`) gives it its nominal scaling back.
    """
    for layer in lora_layers(model, adapter_name):
        layer.set_scale(adapter_name, 0.0)
