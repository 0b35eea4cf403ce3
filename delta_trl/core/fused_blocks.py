"""Forward-mode rules for whole sub-modules of the teacher pass (docs/ARCHITECTURE.md, "Cost").

Under forward-mode AD with grad mode on, every elementwise op of a block computes its primal, its tangent formula,
and records both in the reverse graph (the tangent formulas read primals that require grad); an RMSNorm costs
about ten times its plain forward that way. Here the most common elementwise blocks of decoder LMs get one
``torch.autograd.Function`` each, with a primal bit-identical to the module's, a tangent from an explicit formula and
no graph, and a reverse pass from an explicit formula:

- RMSNorm (Llama's, and every model's whose ``forward`` is the same code): :class:`_RMSNorm`;
- the gated MLP ``down(silu(gate(x)) ⊙ up(x))`` (Llama's and its copies): :class:`_SiluGate` for ``silu(g) ⊙ u``;
- the rotary position embedding (Llama's ``apply_rotary_pos_emb`` and its copies): :class:`_Rotary`.

:func:`fused_blocks` swaps them in for the modules that match, inside the teacher pass only; anything else (other
norms, activations, a trainable norm weight) keeps PyTorch's own rules.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from types import CodeType, FunctionType
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F


def rms_normalize_jvp(x: torch.Tensor, inv_rms: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """The Jacobian of ``n(x) = x·r(x)``, ``r = (mean(x²) + eps)^-½`` over the last dimension, applied to ``v``::

        J·v = r·(v − x·r²·mean(x ⊙ v))

    ``J`` is symmetric, so this is also the reverse-mode rule (``v`` = the output's cotangent). ``inv_rms`` is ``r``
    with a kept last dimension of size 1.
    """
    coefficient = (x * direction).mean(-1, keepdim=True) * inv_rms.pow(3)
    return torch.addcmul(direction * inv_rms, x, coefficient, value=-1.0)  # r·v − x·(r³·mean(x ⊙ v))


class _RMSNorm(torch.autograd.Function):
    """``y = w ⊙ (x·r).to(dtype)``, ``r = rsqrt(mean(x²) + eps)`` computed in fp32 (Llama's RMSNorm), frozen ``w``.

    Tangent ``ẏ = w ⊙ (J·ẋ)`` and input gradient ``J·(w ⊙ ∂L/∂y)`` by :func:`rms_normalize_jvp`, in fp32 and cast back
    to the input dtype, as the module's own ops would do. Saves ``x`` and ``r`` (the module's graph saves ``x``, ``x²``
    's input, ``r`` and the normalised ``x``).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        # the module's own ops, in its order: the primal is bit-identical
        hidden = x.to(torch.float32)
        inv_rms = torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, inv_rms)
        ctx.save_for_forward(x, weight, inv_rms)
        ctx.set_materialize_grads(False)
        return weight * (hidden * inv_rms).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor | None) -> tuple[torch.Tensor | None, None, None]:
        if grad_output is None:
            return None, None, None
        x, weight, inv_rms = ctx.saved_tensors
        cotangent = (weight * grad_output).to(torch.float32)
        return rms_normalize_jvp(x.to(torch.float32), inv_rms, cotangent).to(x.dtype), None, None

    @staticmethod
    def jvp(ctx: Any, x_tangent: torch.Tensor | None, *_: Any) -> torch.Tensor | None:
        if x_tangent is None:
            return None
        x, weight, inv_rms = ctx.saved_tensors
        with torch.no_grad():  # the saved primals require grad: autograd would record the formula
            tangent = rms_normalize_jvp(x.to(torch.float32), inv_rms, x_tangent.to(torch.float32))
            return weight * tangent.to(x.dtype)


class _SiluGate(torch.autograd.Function):
    """``m = silu(g) ⊙ u``, the gate of Llama's MLP, with ``ṁ = silu'(g)·ġ ⊙ u + silu(g) ⊙ u̇`` and
    ``∂L/∂u = ∂L/∂m ⊙ silu(g)``, ``∂L/∂g = silu'(g) ⊙ (∂L/∂m ⊙ u)``. Saves ``g``, ``u``, ``silu(g)``, as the module's
    graph does."""

    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        activated = F.silu(gate)
        ctx.save_for_backward(gate, up, activated)
        ctx.save_for_forward(gate, up, activated)
        ctx.set_materialize_grads(False)
        return activated * up

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if grad_output is None:
            return None, None
        gate, up, activated = ctx.saved_tensors
        grad_gate = torch.ops.aten.silu_backward(grad_output * up, gate) if ctx.needs_input_grad[0] else None
        return grad_gate, grad_output * activated if ctx.needs_input_grad[1] else None

    @staticmethod
    def jvp(ctx: Any, gate_tangent: torch.Tensor | None, up_tangent: torch.Tensor | None) -> torch.Tensor | None:
        gate, up, activated = ctx.saved_tensors
        with torch.no_grad():  # the saved primals require grad: autograd would record the formula
            tangent = None if gate_tangent is None else torch.ops.aten.silu_backward(gate_tangent, gate).mul_(up)
            if up_tangent is not None:
                tangent = activated * up_tangent if tangent is None else tangent.addcmul_(activated, up_tangent)
            return tangent


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``(x1, x2) ↦ (−x2, x1)`` over the halves of the last dimension (Llama's, op for op). Its transpose is its
    negative: ``rotate_halfᵀ(y) = (y2, −y1) = −rotate_half(y)``."""
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


class _Rotary(torch.autograd.Function):
    """Rotary position embedding ``R(x) = x ⊙ cos + rotate_half(x) ⊙ sin``, linear in ``x`` (``cos``, ``sin`` constant):
    ``Ṙ = R(ẋ)``, ``∂L/∂x = Rᵀ(g) = g ⊙ cos − rotate_half(g ⊙ sin)``. One node instead of seven ops, each with a
    forward-mode view or tangent of its own."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        ctx.save_for_forward(cos, sin)
        ctx.set_materialize_grads(False)
        return (x * cos) + (rotate_half(x) * sin)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor | None) -> tuple[torch.Tensor | None, None, None]:
        if grad_output is None:
            return None, None, None
        cos, sin = ctx.saved_tensors
        return grad_output * cos - rotate_half(grad_output * sin), None, None

    @staticmethod
    def jvp(ctx: Any, x_tangent: torch.Tensor | None, *_: Any) -> torch.Tensor | None:
        if x_tangent is None:
            return None
        cos, sin = ctx.saved_tensors
        with torch.no_grad():
            return (x_tangent * cos) + (rotate_half(x_tangent) * sin)


def fused_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama's ``apply_rotary_pos_emb`` through :class:`_Rotary` (its own ops where ``cos``/``sin`` need a gradient
    or carry a tangent, which the rule does not give them)."""
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    constant = not (cos.requires_grad or sin.requires_grad) and all(
        fwAD.unpack_dual(t).tangent is None for t in (cos, sin)
    )
    if not constant:
        return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)
    return _Rotary.apply(q, cos, sin), _Rotary.apply(k, cos, sin)


# The code the rules replace, copied from transformers' LlamaRMSNorm and LlamaMLP: a module is fused only if its
# class's ``forward`` compiles to the same bytecode, constants and names (transformers' copies of these modules in
# other models do; a kernel library's patched forward or a changed upstream does not, and keeps PyTorch's rules).
def _llama_rms_norm_code(self, hidden_states):  # noqa: ANN001, ANN202
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
    return self.weight * hidden_states.to(input_dtype)


def _llama_mlp_code(self, x):  # noqa: ANN001, ANN202
    down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
    return down_proj


def _llama_rotary_code(q, k, cos, sin, unsqueeze_dim=1):  # noqa: ANN001, ANN202
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    q_embed = (q * cos) + (rotate_half(q) * sin)
    k_embed = (k * cos) + (rotate_half(k) * sin)
    return q_embed, k_embed


def _same_code(function: Any, reference: FunctionType) -> bool:
    """Whether ``function`` compiles to the same bytecode, names and constants as ``reference`` (docstrings aside:
    ``co_consts[0]`` holds the docstring, or ``None`` in its place)."""
    code: CodeType | None = getattr(function, "__code__", None)
    if code is None:
        return False

    def body_constants(f: Any) -> tuple:
        constants = f.__code__.co_consts
        return constants[1:] if constants and (constants[0] is None or constants[0] == f.__doc__) else constants

    ref = reference.__code__
    return body_constants(function) == body_constants(reference) and all(
        getattr(code, field) == getattr(ref, field) for field in ("co_code", "co_names", "co_varnames")
    )


def _wrapped_function(obj: Any) -> FunctionType | None:
    """The Python function behind a module-level name: itself, or the one a ``kernels`` function module (what
    transformers' ``use_kernel_forward_from_hub`` makes of a function) calls when no kernel replaced it."""
    if isinstance(obj, FunctionType):
        return obj
    if isinstance(obj, torch.nn.Module) and "forward" not in vars(obj):
        cells = getattr(type(obj).forward, "__closure__", None) or ()
        functions = [cell.cell_contents for cell in cells if isinstance(cell.cell_contents, FunctionType)]
        return functions[0] if len(functions) == 1 else None
    return None


@contextlib.contextmanager
def _fused_rotary_functions(model: torch.nn.Module) -> Iterator[None]:
    """``apply_rotary_pos_emb`` of every modeling module of ``model``'s layers whose code is Llama's runs
    :func:`fused_rotary` inside the block (the attention layers call it by its module-level name, so the name, or the
    ``forward`` of the function module it stands for, is what is patched: for every model of that module, for the
    block's duration; the rule computes the same function, so a concurrent caller gets the same values)."""
    restore: list[Callable[[], None]] = []
    try:
        for name in sorted({type(m).__module__ for m in model.modules()}):
            modeling = sys.modules.get(name)
            target = getattr(modeling, "apply_rotary_pos_emb", None)
            function = _wrapped_function(target)
            if function is None or not _same_code(function, _llama_rotary_code):
                continue
            if not _same_code(getattr(modeling, "rotate_half", None), rotate_half):
                continue
            if isinstance(target, FunctionType):
                modeling.apply_rotary_pos_emb = fused_rotary
                restore.append(
                    lambda modeling=modeling, target=target: setattr(modeling, "apply_rotary_pos_emb", target)
                )
            else:
                target.forward = fused_rotary
                restore.append(lambda target=target: delattr(target, "forward"))
        yield
    finally:
        for undo in reversed(restore):
            undo()


def _rms_norm_forward(self: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    return _RMSNorm.apply(hidden_states, self.weight, self.variance_epsilon)


def _silu_gated_mlp_forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(_SiluGate.apply(self.gate_proj(x), self.up_proj(x)))


def _fused_forward(module: torch.nn.Module) -> Any:
    """The fused forward for ``module`` if its class runs Llama's RMSNorm or SiLU-gated MLP code, else ``None``."""
    from transformers.activations import SiLUActivation

    forward = type(module).forward
    if _same_code(forward, _llama_rms_norm_code):
        return None if module.weight.requires_grad else _rms_norm_forward
    if _same_code(forward, _llama_mlp_code) and type(module.act_fn) in (torch.nn.SiLU, SiLUActivation):
        return _silu_gated_mlp_forward
    return None


def autocast_enabled(model: torch.nn.Module) -> bool:
    """Whether autocast is on for the device of ``model``'s parameters (``torch.is_autocast_enabled()`` without a
    device type reads CUDA's state only)."""
    parameter = next(model.parameters(), None)
    return torch.is_autocast_enabled(parameter.device.type if parameter is not None else "cpu")


@contextlib.contextmanager
def fused_blocks(model: torch.nn.Module) -> Iterator[None]:
    """Inside the block, the RMSNorms, SiLU-gated MLPs and rotary embeddings of ``model`` that match Llama's code run
    :class:`_RMSNorm`, :class:`_SiluGate` and :class:`_Rotary` (the same primal, explicit tangent and reverse rules). Nothing changes under autocast (the
    rules would bypass its casts); modules with an instance-level ``forward`` are left alone."""
    if autocast_enabled(model):
        yield
        return
    patched: list[torch.nn.Module] = []
    try:
        for module in model.modules():
            forward = None if "forward" in vars(module) else _fused_forward(module)
            if forward is not None:
                module.forward = forward.__get__(module)
                patched.append(module)
        with _fused_rotary_functions(model):
            yield
    finally:
        for module in patched:
            del module.forward
