"""Forward-mode rules for whole sub-modules of the teacher pass (docs/ARCHITECTURE.md, "Cost").

Under forward-mode AD with grad mode on, every elementwise op of a block computes its primal, its tangent formula,
and records both in the reverse graph (the tangent formulas read primals that require grad); an RMSNorm costs
about ten times its plain forward that way. Here the two most common elementwise blocks of decoder LMs get one
``torch.autograd.Function`` each, with a primal bit-identical to the module's, a tangent from an explicit formula and
no graph, and a reverse pass from an explicit formula:

- RMSNorm (Llama's, and every model's whose ``forward`` is the same code): :class:`_RMSNorm`;
- the gated MLP ``down(silu(gate(x)) ⊙ up(x))`` (Llama's and its copies): :class:`_SiluGate` for ``silu(g) ⊙ u``.

:func:`fused_blocks` swaps them in for the modules that match, inside the teacher pass only; anything else (other
norms, activations, a trainable norm weight) keeps PyTorch's own rules.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import CodeType, FunctionType
from typing import Any

import torch
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


def _same_code(function: Any, reference: FunctionType) -> bool:
    """Whether ``function`` compiles to the same bytecode, constants and names as ``reference``."""
    code: CodeType | None = getattr(function, "__code__", None)
    ref = reference.__code__
    return code is not None and all(
        getattr(code, field) == getattr(ref, field) for field in ("co_code", "co_consts", "co_names", "co_varnames")
    )


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
    """Inside the block, the RMSNorms and SiLU-gated MLPs of ``model`` that match Llama's code run :class:`_RMSNorm`
    and :class:`_SiluGate` (the same primal, explicit tangent and reverse rules). Nothing changes under autocast (the
    rules would bypass its casts); modules with an instance-level ``forward`` are left alone."""
    patched: list[torch.nn.Module] = []
    try:
        if not autocast_enabled(model):
            for module in model.modules():
                forward = None if "forward" in vars(module) else _fused_forward(module)
                if forward is not None:
                    module.forward = forward.__get__(module)
                    patched.append(module)
        yield
    finally:
        for module in patched:
            del module.forward
