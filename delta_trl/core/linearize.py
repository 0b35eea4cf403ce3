"""The linearized LoRA model, computed with forward-mode AD along the LoRA scaling (the ε-trick, docs/METHOD.md §2).

For a teacher adapter with effective update ``τ_T = {s·B_T·A_T}``, scale its LoRA scaling by a scalar ``ε`` (all other
adapters scaled by 0) and differentiate ``ε ↦ f(x; θ0 + ε·τ_T)`` at ``ε = 0`` with tangent 1::

    primal  = f(x; θ0)                      (the base model: also the DPO reference output)
    tangent = J_θ f(x; θ0) · τ_T            (one JVP, no dense ΔW, no functional_call)
    f_lin(x; α·τ_T) = primal + α·tangent    (any point of the interpolation path for free)

The tangent stays differentiable with respect to the teacher's ``lora_A``/``lora_B`` (reverse mode through the JVP),
so a loss on ``f_lin`` trains the teacher in the tangent space.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from torch.nn.attention import SDPBackend, sdpa_kernel

from delta_trl.core.adapters import check_linear_lora, lora_layers, nominal_scaling, only_adapter, scaled_adapters
from delta_trl.core.fused_blocks import autocast_enabled, fused_blocks


# Attention implementations whose kernels have a forward-mode AD formula (SDPA is forced onto its MATH backend).
JVP_ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa")


@dataclass(frozen=True)
class LinearizedOutput:
    """Primal and tangent of the output of a model linearized around θ0 along one adapter.

    Attributes:
        base_logits: ``f(x; θ0)``, shape ``(B, T, V)``. Detached.
        tangent_logits: ``J f(x; θ0)·τ``, same shape; differentiable w.r.t. the adapter's LoRA weights.
        base_hidden: the requested hidden states at θ0 (decoder's for encoder-decoder models), each ``(B, T, H)``.
        tangent_hidden: their tangents, same shapes.
    """

    base_logits: torch.Tensor
    tangent_logits: torch.Tensor
    base_hidden: tuple[torch.Tensor, ...]
    tangent_hidden: tuple[torch.Tensor, ...]

    def logits(self, alpha: float = 1.0) -> torch.Tensor:
        """``f_lin(x; α·τ) = f(x; θ0) + α·J f(x; θ0)·τ``."""
        return torch.add(self.base_logits, self.tangent_logits, alpha=alpha)  # one (N, V) pass, no α·T temporary

    def hidden(self, alpha: float = 1.0) -> tuple[torch.Tensor, ...]:
        return tuple(h0 + alpha * dh for h0, dh in zip(self.base_hidden, self.tangent_hidden, strict=True))


def check_jvp_support(model: torch.nn.Module) -> None:
    """Raise if the model's attention kernel has no forward-mode AD (flash-attention, flex, paged...)."""
    config = getattr(model, "config", None)
    implementation = getattr(config, "_attn_implementation", None)
    if implementation is not None and implementation not in JVP_ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"The model uses attn_implementation={implementation!r}, which has no forward-mode AD, so the "
            f"linearized teacher cannot be computed. Load the model with attn_implementation='sdpa' or 'eager' "
            f"(SDPA is switched to its MATH kernel for the teacher pass only)."
        )


def num_hidden_states(config: Any) -> int:
    """How many hidden states ``output_hidden_states=True`` returns for the (decoder) stack: layers + embeddings."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text_config, "is_encoder_decoder", False):
        layers = getattr(text_config, "num_decoder_layers", None) or text_config.num_hidden_layers
    else:
        layers = text_config.num_hidden_layers
    return layers + 1


def check_hidden_layers(config: Any, layers: Sequence[int]) -> None:
    """Raise if a requested hidden-state index does not exist for this model."""
    count = num_hidden_states(config)
    bad = [i for i in layers if not -count <= i < count]
    if bad:
        raise ValueError(
            f"Hidden-state indices {bad} do not exist: the model returns {count} hidden states "
            f"(embeddings + {count - 1} layers), so valid indices are {-count}..{count - 1}."
        )
    if not layers:
        raise ValueError("At least one hidden-state index is needed (use [-1] for the last hidden state).")


def hidden_states_of(outputs: Any, is_encoder_decoder: bool) -> tuple[torch.Tensor, ...]:
    """The hidden-state tuple the distillation uses: the decoder's for encoder-decoder models."""
    states = outputs.decoder_hidden_states if is_encoder_decoder else outputs.hidden_states
    if states is None:
        raise ValueError("The model did not return hidden states although output_hidden_states=True was passed.")
    return states


def checkpointed_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules with activation (gradient) checkpointing switched on (transformers' per-layer flag)."""
    return [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]


@contextlib.contextmanager
def checkpointing_off(model: torch.nn.Module) -> Iterator[None]:
    """Activation checkpointing off inside the block, per layer, restored on exit.

    The flag is flipped on each layer rather than through ``activation_checkpointing_disable/enable``, which would
    re-register the input-embedding hooks on every call.
    """
    checkpointed = checkpointed_modules(model)
    try:
        for module in checkpointed:
            module.gradient_checkpointing = False
        yield
    finally:
        for module in checkpointed:
            module.gradient_checkpointing = True


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """``model.eval()`` inside the block (no dropout), the previous mode restored on exit."""
    was_training = model.training
    try:
        model.eval()
        yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def at_theta0(model: torch.nn.Module) -> Iterator[None]:
    """The base model θ0 exactly: eval mode and every LoRA adapter scaled to 0 (none toggled); restored on exit."""
    names = {name for layer in lora_layers(model) for name in layer.scaling}
    with eval_mode(model), scaled_adapters(model, dict.fromkeys(names, 0.0)):
        yield


@contextlib.contextmanager
def jvp_safe_mode(model: torch.nn.Module) -> Iterator[None]:
    """Put ``model`` in a state where ``torch.func.jvp`` works, restoring everything on exit.

    - eval mode: no dropout (T5 ``dropout_rate``, ``lora_dropout``), so the teacher is deterministic;
    - activation checkpointing off: its recomputation is not traceable by forward AD (pytorch/functorch#993);
    - SDPA on its MATH kernel: the fused flash/efficient kernels have no forward-mode AD formula.

    The input embeddings' ``requires_grad_`` hooks (``enable_input_require_grads``, which raise inside functorch
    transforms) are avoided rather than removed: :func:`forward_kwargs` embeds the tokens outside the transform.
    """
    with eval_mode(model), checkpointing_off(model), sdpa_kernel(SDPBackend.MATH):
        yield


def check_input_embeddings_frozen(model: torch.nn.Module) -> None:
    """Raise if a LoRA adapter sits on the input embeddings: the teacher pass embeds tokens outside the JVP."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    modules = [base.get_input_embeddings()]
    if getattr(base.config, "is_encoder_decoder", False) and hasattr(base, "get_decoder"):
        modules.append(base.get_decoder().get_input_embeddings())
    if any(isinstance(module, LoraLayer) for module in modules):
        raise ValueError(
            "A LoRA adapter targets the input embeddings; the linearized teacher needs them frozen (its pass embeds "
            "the tokens outside the forward-mode transform). Remove the embedding layer from target_modules, or use "
            "delta_mode='nonlinear'."
        )


def forward_kwargs(model: torch.nn.Module, inputs: Mapping[str, Any], *, embed: bool = False) -> dict[str, Any]:
    """Forward kwargs without labels (the loss is computed outside, token-exact), with hidden states requested and
    decoder inputs built from the labels for encoder-decoder models.

    With ``embed=True`` token ids are replaced by their (detached) embeddings, computed here, outside any
    ``torch.func`` transform: the ``requires_grad_`` hooks that PEFT and transformers put on the input embeddings
    (for gradient checkpointing) then run where they are harmless, and the teacher pass never calls them.
    """
    kwargs = {k: v for k, v in inputs.items() if k not in ("labels", "num_items_in_batch")}
    config = model.config
    is_encoder_decoder = getattr(config, "is_encoder_decoder", False)
    if is_encoder_decoder and "decoder_input_ids" not in kwargs and "decoder_inputs_embeds" not in kwargs:
        if "labels" not in inputs:
            raise ValueError("An encoder-decoder model needs `labels` or `decoder_input_ids` for the teacher pass.")
        kwargs["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(labels=inputs["labels"])
    if embed:
        with torch.no_grad():
            if "input_ids" in kwargs:
                kwargs["inputs_embeds"] = model.get_input_embeddings()(kwargs.pop("input_ids")).detach()
            if "decoder_input_ids" in kwargs:
                decoder_embeddings = model.get_decoder().get_input_embeddings()
                kwargs["decoder_inputs_embeds"] = decoder_embeddings(kwargs.pop("decoder_input_ids")).detach()
    kwargs["output_hidden_states"] = True
    kwargs["return_dict"] = True
    if getattr(config, "use_cache", None) is not None:
        # No pass here generates: a KV cache would only hold memory, and a checkpointed block's recomputation would
        # append to it a second time.
        kwargs["use_cache"] = False
    return kwargs


def linearized_forward(
    model: PeftModel,
    inputs: Mapping[str, Any],
    adapter_name: str | Sequence[str],
    hidden_layers: Sequence[int] = (-1,),
    *,
    differentiable: bool = True,
) -> LinearizedOutput:
    """Primal ``f(x; θ0)`` and tangent ``J f(x; θ0)·τ`` of a PEFT model along one LoRA adapter.

    Every other adapter of the model is scaled to 0 for this pass and left untouched (weights, ``requires_grad``,
    active set). The model is run in eval mode, without activation checkpointing and with SDPA on its MATH kernel
    (see :func:`jvp_safe_mode`); its previous state is restored.

    Args:
        model: a ``PeftModel`` (unwrapped from DDP/DeepSpeed: ``torch.func`` cannot trace the wrappers).
        inputs: the batch (``input_ids``, ``attention_mask``, ``labels``/``decoder_input_ids``...). ``labels`` are
            not passed to the model.
        adapter_name: the LoRA adapter that defines the tangent ``τ``; several adapters give the tangent of their sum,
            ``J·Σ_t τ_t = Σ_t J·τ_t`` (one JVP instead of one per adapter).
        hidden_layers: indices into the hidden-state tuple (decoder's for encoder-decoder models).
        differentiable: keep the autograd graph through the tangent (when grad mode is on), so that a loss on it
            backpropagates to the adapter. ``False`` runs the JVP without a graph (≈ 2 forwards, no activation
            memory); train through :func:`linearized_loss` instead, which gives the same gradient for less.

    Returns:
        :class:`LinearizedOutput`. The primal is detached; the tangent carries the autograd graph to the adapter's
        LoRA weights when ``differentiable`` and grad mode is on.
    """
    names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
    for name in names:
        check_linear_lora(model, name)
    check_jvp_support(model)
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    is_encoder_decoder = bool(getattr(base.config, "is_encoder_decoder", False))
    kwargs = forward_kwargs(base, inputs, embed=True)
    others = {name: 0.0 for layer in lora_layers(model) for name in layer.scaling if name not in names}

    def forward(eps: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with scaled_adapters(model, dict.fromkeys(names, eps)):
            outputs = model(**kwargs)
        hidden = hidden_states_of(outputs, is_encoder_decoder)
        return (outputs.logits, *(hidden[i] for i in hidden_layers))

    zero = torch.zeros((), dtype=torch.float32, device=next(model.parameters()).device)
    graph = differentiable and torch.is_grad_enabled()
    grad_mode = torch.enable_grad() if graph else torch.no_grad()
    # the one-matmul rule is not differentiable in reverse mode: only without a graph through the tangent
    frozen = contextlib.nullcontext() if graph else frozen_linear_jvp(model)
    with jvp_safe_mode(model), frozen, scaled_adapters(model, others), grad_mode:
        primals, tangents = torch.func.jvp(forward, (zero,), (torch.ones_like(zero),))
    return LinearizedOutput(
        base_logits=primals[0].detach(),
        tangent_logits=tangents[0],
        base_hidden=tuple(p.detach() for p in primals[1:]),
        tangent_hidden=tuple(tangents[1:]),
    )


def linearized_loss(
    model: PeftModel,
    inputs: Mapping[str, Any],
    adapter_name: str,
    linearized: LinearizedOutput,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    alpha: float = 1.0,
    forward_model: torch.nn.Module | None = None,
) -> torch.Tensor:
    """``L(f_lin(x; α·τ))`` with the exact gradient w.r.t. the adapter's LoRA weights, without backpropagating
    through the JVP.

    With ``T = J f(θ0)·τ`` and ``u = ∂L/∂z`` at ``z = f(θ0) + α·T``, the gradient is ``α·(∂T/∂θ_τ)ᵀ u``. Since the
    adapter's output ``s·B·A·x_l`` enters each layer ``l`` additively, ``⟨T, α·u⟩ = Σ_l ⟨δ_l, s·B_l·A_l·x_l⟩`` where
    ``x_l`` is the layer's input and ``δ_l = ∂⟨f(θ0), α·u⟩/∂y_l`` the backpropagated cotangent at its output, both at
    θ0. One reverse pass at θ0 gives every ``δ_l``; the returned tensor has the value of ``L`` and the gradient of
    ``S = Σ_l ⟨δ_l, s·B_l·A_l·x_l⟩`` (``x_l``, ``δ_l`` fixed). That costs a forward and a partial backward at θ0
    instead of a backward through the forward-mode graph, and keeps no tangent activations alive.

    Args:
        model, inputs, adapter_name: as for :func:`linearized_forward`; the adapter must have its real scaling.
        linearized: the output of ``linearized_forward(..., differentiable=False)`` on the same inputs.
        loss_fn: maps linearized logits ``(B, T, V)`` to a scalar loss.
        alpha: the point of the path, ``f_lin = f(θ0) + α·T``.
        forward_model: what runs the forward at θ0, ``model`` by default. Pass the DDP/DeepSpeed-wrapped model when
            no other wrapped forward runs in the step (``linear`` mode): DDP all-reduces only the gradients of a
            step whose forward went through the wrapper.
    """
    if not torch.is_grad_enabled():  # evaluation: the value is all that is needed
        return loss_fn(linearized.logits(alpha).detach())
    logits = linearized.logits(alpha).detach().requires_grad_(True)
    loss = loss_fn(logits)
    # α·u, with α folded into the loss's backward (a scalar there) rather than applied to the (N, V) cotangent
    (cotangent,) = torch.autograd.grad(loss, logits, grad_outputs=torch.full_like(loss, alpha))
    layers = lora_layers(model, adapter_name)
    captured: list[tuple[LoraLayer, torch.Tensor, torch.Tensor]] = []

    def capture(layer, args, output):
        captured.append((layer, args[0].detach(), output))

    base = model.get_base_model() if isinstance(model, PeftModel) else model
    kwargs = forward_kwargs(base, inputs, embed=True)
    zeros = {name: 0.0 for layer in lora_layers(model) for name in layer.scaling}
    handles = [layer.register_forward_hook(capture) for layer in layers]
    try:
        with jvp_safe_mode(model), scaled_adapters(model, zeros), torch.enable_grad():
            base_logits = (forward_model or model)(**kwargs).logits
            outputs = [output for _, _, output in captured]
            deltas = torch.autograd.grad(base_logits, outputs, grad_outputs=cotangent, allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    surrogate = loss.new_zeros(())
    for (layer, x, _), delta in zip(captured, deltas, strict=True):
        if delta is None:  # the layer does not reach the logits (e.g. an unused branch)
            continue
        lora_a, lora_b = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
        update = lora_b(lora_a(x.to(lora_a.weight.dtype))) * layer.scaling[adapter_name]
        surrogate = surrogate + (delta.detach().to(update.dtype) * update).sum().to(surrogate.dtype)
    return loss.detach() + surrogate - surrogate.detach()


# ---- the exact teacher at its cost floor (docs/ARCHITECTURE.md, "Cost") ---------------------------------------------


class _FrozenLinear(torch.autograd.Function):
    """``y = x·Wᵀ + b`` for a frozen ``W``, ``b``, with the one-matmul forward-mode rule ``ẏ = ẋ·Wᵀ``.

    PyTorch's forward-AD formula for a linear layer is ``ẋ·Wᵀ + x·Ẇᵀ``, and a frozen ``W`` gets a materialised zero
    tangent ``Ẇ``, so every frozen layer costs three matmuls in a JVP instead of two. The result is bit-identical.
    Reverse mode: ``∂L/∂x = ∂L/∂y·W`` (no weight gradient: the weight is frozen).
    """

    @staticmethod
    def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        ctx.save_for_backward(inputs[1])
        ctx.save_for_forward(inputs[1])
        # Materialising would give the frozen weight and bias a zero tangent of their own size, kept as their forward
        # gradient until the dual level closes: the size of the whole model again, at the end of the forward.
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor | None) -> tuple[torch.Tensor | None, None, None]:
        (weight,) = ctx.saved_tensors
        return None if grad_output is None else grad_output @ weight, None, None

    @staticmethod
    def jvp(ctx: Any, x_tangent: torch.Tensor | None, *_: Any) -> torch.Tensor | None:
        (weight,) = ctx.saved_tensors
        return None if x_tangent is None else F.linear(x_tangent, weight)


def _frozen_linear_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return _FrozenLinear.apply(x, self.weight, self.bias)


def _is_frozen_linear(module: torch.nn.Module | None) -> bool:
    """A plain ``nn.Linear`` (not a LoRA layer or a subclass) whose weight and bias take no gradient."""
    return type(module) is torch.nn.Linear and not any(p.requires_grad for p in module.parameters())


@contextlib.contextmanager
def frozen_linear_jvp(model: torch.nn.Module) -> Iterator[None]:
    """Inside the block every frozen ``nn.Linear`` of ``model`` (base layers under LoRA, the LM head) propagates
    tangents with one matmul (:class:`_FrozenLinear`). Nothing changes under autocast (the rule would bypass its
    casts) or for layers with a trainable weight or bias (the LoRA factors)."""
    patched: list[torch.nn.Module] = []
    try:
        if not autocast_enabled(model):
            for module in model.modules():
                if _is_frozen_linear(module) and "forward" not in vars(module):
                    module.forward = _frozen_linear_forward.__get__(module)
                    patched.append(module)
        yield
    finally:
        for module in patched:
            del module.forward


# SDPA's kernels in the order PyTorch prefers them; MATH last, for what the fused ones refuse (e.g. some masks/dtypes).
_FUSED_FIRST = [
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.MATH,
]


def attention_tangent(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    tangents: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None],
    attn_mask: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """The tangent of ``O = P·V``, ``P = softmax(S)``, ``S = s·Q·Kᵀ + M`` (SDPA's semantics) for tangents ``(Q̇, K̇, V̇)``
    (``None`` = zero)::

        Ṡ = s·(Q̇·Kᵀ + Q·K̇ᵀ)      Ṗ = P ⊙ (Ṡ − rowsum(P ⊙ Ṡ))      Ȯ = Ṗ·V + P·V̇

    ``M``: a bool mask (``True`` = attend) or an additive float one, ``is_causal`` the upper-left causal mask,
    ``enable_gqa`` shares each key/value head among ``H_q/H_kv`` query heads; a fully masked row has ``P = 0`` (as
    SDPA's MATH kernel). ``s`` defaults to ``1/sqrt(E)``. Computes ``P`` ``(…, L, S)`` transiently, without a graph.
    """
    tq, tk, tv = tangents
    if tq is None and tk is None and tv is None:
        return query.new_zeros((*query.shape[:-1], value.shape[-1]))
    heads, length = query.shape[-3:-1] if query.dim() >= 3 else (1, query.shape[-2])
    groups = heads // key.shape[-3] if enable_gqa and query.dim() >= 3 else 1
    scale = query.shape[-1] ** -0.5 if scale is None else scale

    # GQA without repeating keys and values: the G query heads that share a key/value head are stacked along the
    # rows, (…, H, L, E) -> (…, H/G, G·L, E), so one matmul per key/value head serves them all.
    def grouped(t: torch.Tensor) -> torch.Tensor:
        return t if groups == 1 else t.reshape(*t.shape[:-3], t.shape[-3] // groups, groups * length, t.shape[-1])

    def per_query_head(t: torch.Tensor) -> torch.Tensor:  # (…, H/G, G·L, S) seen as (…, H/G, G, L, S)
        return t if groups == 1 else t.view(*t.shape[:-2], groups, length, t.shape[-1])

    def mask_for(mask: torch.Tensor) -> torch.Tensor:  # SDPA's broadcast of a mask, in the grouped layout
        if groups == 1:
            return mask
        if mask.dim() >= 3 and mask.shape[-3] == heads:
            return mask.reshape(*mask.shape[:-3], heads // groups, groups, *mask.shape[-2:])
        return mask.unsqueeze(-3)

    scaled_query = grouped(query * scale)  # s folded into (L, E) factors rather than applied to (L, S) scores
    key_t = key.transpose(-2, -1)
    scores = scaled_query @ key_t
    masked = per_query_head(scores)
    if is_causal:
        masked.masked_fill_(~torch.ones(*masked.shape[-2:], dtype=torch.bool, device=scores.device).tril(), -math.inf)
    if attn_mask is not None:
        mask = mask_for(attn_mask)
        if mask.dtype == torch.bool:
            masked.masked_fill_(~mask, -math.inf)
        else:
            masked.add_(mask)
    probs = torch.softmax(scores, dim=-1)
    del scores, masked
    if attn_mask is not None:  # a row that attends to nothing: NaN -> 0, as the MATH kernel
        probs = probs.nan_to_num_(0.0)
    out = None
    if tq is not None or tk is not None:
        d_scores = grouped(tq * scale) @ key_t if tq is not None else None
        if tk is not None:
            term = scaled_query @ tk.transpose(-2, -1)
            d_scores = term if d_scores is None else d_scores.add_(term)
            del term
        # Ṗ = P ⊙ (Ṡ − rowsum(P ⊙ Ṡ)), in place
        d_probs = d_scores.mul_(probs)
        d_probs.addcmul_(probs, d_probs.sum(dim=-1, keepdim=True), value=-1.0)
        out = d_probs @ value
        del d_scores, d_probs
    if tv is not None:
        out = probs @ tv if out is None else out.add_(probs @ tv)
    return out if groups == 1 else out.reshape(*query.shape[:-1], value.shape[-1])


class _FusedAttention(torch.autograd.Function):
    """SDPA whose primal runs the fastest kernel and whose reverse pass saves only ``Q``, ``K``, ``V``.

    Forward-mode AD needs SDPA's MATH kernel, whose reverse graph saves the ``(L, S)`` attention matrices of every
    layer (the bulk of the teacher pass's memory at 256 tokens and more). Here the primal is computed by a fused
    kernel, the tangent by :func:`attention_tangent` (no graph), and the backward recomputes the fused forward and
    differentiates it: the θ0 reverse pass of the teacher runs the fused kernels' backward, the graph keeps ``Q``,
    ``K``, ``V`` (and the mask) per layer. Dropout is not supported (the teacher runs in eval mode).
    """

    @staticmethod
    def forward(
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None,
        scale: float | None,
        is_causal: bool,
        enable_gqa: bool,
    ) -> torch.Tensor:
        with sdpa_kernel(_FUSED_FIRST, set_priority=True):
            return F.scaled_dot_product_attention(
                query, key, value, attn_mask=attn_mask, scale=scale, is_causal=is_causal, enable_gqa=enable_gqa
            )

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        query, key, value, attn_mask, scale, is_causal, enable_gqa = inputs
        ctx.save_for_backward(query, key, value, attn_mask)
        ctx.save_for_forward(query, key, value, attn_mask)
        ctx.options = {"scale": scale, "is_causal": is_causal, "enable_gqa": enable_gqa}
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        if grad_out is None:
            return (None,) * 7
        query, key, value, attn_mask = ctx.saved_tensors
        needed = ctx.needs_input_grad[:3]
        with torch.enable_grad():
            inputs = [t.detach().requires_grad_(need) for t, need in zip((query, key, value), needed, strict=True)]
            with sdpa_kernel(_FUSED_FIRST, set_priority=True):
                out = F.scaled_dot_product_attention(*inputs, attn_mask=attn_mask, **ctx.options)
            grads = iter(torch.autograd.grad(out, [t for t in inputs if t.requires_grad], grad_out))
        return (*(next(grads) if need else None for need in needed), None, None, None, None)

    @staticmethod
    def jvp(
        ctx: Any, tq: torch.Tensor | None, tk: torch.Tensor | None, tv: torch.Tensor | None, *_: Any
    ) -> torch.Tensor:
        query, key, value, attn_mask = ctx.saved_tensors
        with torch.no_grad():
            return attention_tangent(query, key, value, (tq, tk, tv), attn_mask, **ctx.options)


class _FusedAttentionMode(torch.overrides.TorchFunctionMode):
    """Routes ``F.scaled_dot_product_attention`` calls to :class:`_FusedAttention`, except with dropout or a mask that
    has a tangent or needs a gradient (the rule gives the mask neither)."""

    def __torch_function__(self, func: Callable, types: tuple, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
        call = {**dict(zip(names, args, strict=False)), **kwargs}
        mask = call.get("attn_mask")
        mask_differentiable = mask is not None and (mask.requires_grad or fwAD.unpack_dual(mask).tangent is not None)
        if call.get("dropout_p", 0.0) != 0.0 or mask_differentiable:
            return func(*args, **kwargs)
        return _FusedAttention.apply(
            call["query"],
            call["key"],
            call["value"],
            mask,
            call.get("scale"),
            bool(call.get("is_causal", False)),
            bool(call.get("enable_gqa", False)),
        )


def lora_factor_gradients(
    x: torch.Tensor, delta: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``S = ⟨δ, s·x·Aᵀ·Bᵀ⟩`` w.r.t. ``A`` ``(r, d_in)`` and ``B`` ``(d_out, r)``, for a layer input
    ``x`` ``(…, d_in)`` and output cotangent ``δ`` ``(…, d_out)`` flattened to ``X`` ``(M, d_in)``, ``D`` ``(M, d_out)``::

        ∂S/∂A = s·(D·B)ᵀ·X        ∂S/∂B = s·Dᵀ·(X·Aᵀ)

    (r×d work on top of the two thin matmuls; no activation-sized tensor outlives the call).
    """
    x2 = x.reshape(-1, x.shape[-1]).to(lora_a.dtype)
    d2 = delta.reshape(-1, delta.shape[-1]).to(lora_b.dtype)
    return scaling * (d2 @ lora_b).T @ x2, scaling * d2.T @ (x2 @ lora_a.T)


def _strip_tangent(tensor: torch.Tensor) -> torch.Tensor:
    # A tensor saved for the reverse pass keeps its forward-AD tangent alive until the dual level closes; a detached
    # alias (same storage, no tangent, no autograd meta) lets each tangent die once the forward has moved past it.
    return tensor.detach()


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _tensors_in(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a (nested) tuple, list or dict: a layer's args, kwargs or outputs (ModelOutput is a dict)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _tensors_in(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors_in(item)


def _tangent_storages(tensors: Iterator[torch.Tensor]) -> set[int]:
    storages = set()
    for tensor in tensors:
        tangent = fwAD.unpack_dual(tensor).tangent
        if tangent is not None:
            storages.add(tangent.untyped_storage().data_ptr())
    return storages


def _outermost(modules: Sequence[torch.nn.Module]) -> list[torch.nn.Module]:
    """The modules of the list that no other module of the list contains."""
    inner = {m for module in modules for m in module.modules() if m is not module}
    return [m for m in modules if m not in inner]


def _outermost_blocks(model: torch.nn.Module, *, checkpointed_only: bool = False) -> list[torch.nn.Module]:
    """transformers' ``GradientCheckpointingLayer`` blocks (every decoder/encoder block) not nested in another; with
    ``checkpointed_only`` those the user checkpoints (``every_n_layers`` may skip some). Other modules carry the flag
    too (``LlamaModel``, ``T5Stack``, ``T5Attention``), but the blocks are what transformers checkpoints."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    candidates = checkpointed_modules(model) if checkpointed_only else model.modules()
    return _outermost([m for m in candidates if isinstance(m, GradientCheckpointingLayer)])


@contextlib.contextmanager
def _theta0_state(model: torch.nn.Module, adapter_name: str) -> Iterator[None]:
    """The state the teacher's θ0 forward runs in, re-entered when a checkpointed block of it is recomputed: θ0
    (:func:`at_theta0`) with SDPA on its fused kernels first and the fused block rules (:func:`fused_blocks`), as in
    the one-pass teacher, so that both give the same gradient. Only ``adapter_name``'s branch runs (at scale 0:
    it is what makes the LoRA outputs ``y_l`` nodes of the graph)."""
    with (
        at_theta0(model),
        only_adapter(model, adapter_name),
        sdpa_kernel(_FUSED_FIRST, set_priority=True),
        fused_blocks(model),
    ):
        yield


@contextlib.contextmanager
def _checkpointed_blocks(
    model: torch.nn.Module, blocks: Sequence[torch.nn.Module], adapter_name: str
) -> Iterator[None]:
    """Run each of ``blocks`` (of the θ0 forward) under non-reentrant activation checkpointing.

    ``blocks``: the layers the user checkpoints (``_outermost_blocks(model, checkpointed_only=True)``, so
    ``every_n_layers`` holds), taken before :func:`jvp_safe_mode` switches the flag off. Each runs through its own
    checkpoint function (the user's ``activation_checkpointing_kwargs``, ``offload``), with three arguments fixed
    here. ``use_reentrant=False``: the reentrant variant runs the block without a graph, so the LoRA outputs ``y_l``
    that :func:`linearized_teacher_loss` differentiates at would not be graph nodes. ``context_fn``: the backward
    recomputes the block in :func:`_theta0_state`, since by then the trainer has put the model back in train mode
    with the adapters at their training scales. ``preserve_rng_state=False``: in eval mode nothing draws from it.
    """
    from torch.utils.checkpoint import checkpoint

    def contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        return contextlib.nullcontext(), _theta0_state(model, adapter_name)

    def checkpointed(block: torch.nn.Module) -> Callable[..., Any]:
        forward = block.forward
        checkpoint_fn = getattr(block, "_gradient_checkpointing_func", checkpoint)

        def run(*args: Any, **kwargs: Any) -> Any:
            fixed = {"use_reentrant": False, "context_fn": contexts, "preserve_rng_state": False}
            return checkpoint_fn(forward, *args, **fixed, **kwargs)

        return run

    patched = []
    try:
        for block in blocks:
            if "forward" in vars(block):
                raise RuntimeError(
                    f"{type(block).__name__}.forward is patched on the instance; the teacher cannot checkpoint it."
                )
            block.forward = checkpointed(block)
            patched.append(block)
        yield
    finally:
        for block in patched:
            del block.forward


def _theta0_graph_forward(
    model: PeftModel,
    kwargs: Mapping[str, Any],
    adapter_name: str,
    *,
    checkpointed: Sequence[torch.nn.Module] = (),
    forward_model: torch.nn.Module | None = None,
) -> tuple[Any, list[tuple[LoraLayer, torch.Tensor, torch.Tensor]]]:
    """The θ0 forward whose reverse graph :func:`linearized_teacher_loss` backpropagates through, and the
    ``(layer, x_l, y_l)`` of every LoRA layer of the adapter. Call inside :func:`jvp_safe_mode`, with no dual level
    open. The ``checkpointed`` layers keep only their inputs and are recomputed in the backward."""
    captured: list[tuple[LoraLayer, torch.Tensor, torch.Tensor]] = []

    def capture(layer: LoraLayer, args: tuple, output: torch.Tensor) -> None:
        captured.append((layer, args[0].detach(), output))

    handles = [layer.register_forward_hook(capture) for layer in lora_layers(model, adapter_name)]
    try:
        with _theta0_state(model, adapter_name), _checkpointed_blocks(model, checkpointed, adapter_name):
            outputs = (forward_model or model)(**kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return outputs, captured


class _SavedTangentRelease:
    """Free the tangents that the θ0 graph's saved tensors pin, one transformer layer at a time.

    PyTorch's ``SavedVariable`` stores the forward gradient of every saved input beside it (whatever the saved-tensor
    hooks return) and lets go of it only when the dual level closes, so every tangent a layer computes and saves would
    live as long as the pass: about twice an ordinary forward's activations (docs/ARCHITECTURE.md, "Cost"). Those
    saved forward gradients are never read again: the reverse pass runs after the level has closed, and the level's
    exit only drops them. A layer's own tangents are dead once the layer has returned, except those that leave it
    (its outputs) or came into it (its args and kwargs, e.g. the residual stream or T5's encoder states), and the
    tangents the pass was started with (``keep_tangents``). So at each outermost layer's exit the storage of every
    other tangent saved inside it is released (``resize_(0)``); the tensor objects stay, empty, until the level
    closes.
    Layers are transformers' ``GradientCheckpointingLayer`` blocks (every decoder/encoder block); a model without
    them keeps everything, as before.
    """

    def __init__(self, model: torch.nn.Module, keep_tangents: Sequence[torch.Tensor]) -> None:
        self.blocks = _outermost_blocks(model)
        self.keep = {tangent.untyped_storage().data_ptr() for tangent in keep_tangents}
        self.open: list[tuple[set[int], list[torch.Tensor]]] = []  # (kept storages, saved tangents) per open block
        self.handles: list[torch.utils.hooks.RemovableHandle] = []

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.open:
            tangent = fwAD.unpack_dual(tensor).tangent
            if tangent is not None:
                self.open[-1][1].append(tangent)
        return _strip_tangent(tensor)

    def _enter(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self.open.append((_tangent_storages(_tensors_in((args, kwargs))), []))

    def _exit(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        kept, saved = self.open.pop()
        kept |= self.keep | _tangent_storages(_tensors_in(output))
        for tangent in saved:
            storage = tangent.untyped_storage()
            if storage.data_ptr() not in kept and storage.nbytes() > 0:
                storage.resize_(0)

    def __enter__(self) -> _SavedTangentRelease:
        for block in self.blocks:
            self.handles.append(block.register_forward_pre_hook(self._enter, with_kwargs=True))
            self.handles.append(block.register_forward_hook(self._exit, with_kwargs=True))
        self._saved = torch.autograd.graph.saved_tensors_hooks(self.pack, _identity)
        self._saved.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._saved.__exit__(*exc)
        for handle in self.handles:
            handle.remove()
        self.open.clear()


def _cut_tangent_graph(module: torch.nn.Module, args: Any, output: Any) -> Any:
    """Forward hook: the same output with its tangent detached from the reverse graph.

    With grad mode on, autograd also records the forward-AD tangent formulas (they read primal activations that
    require grad), so a live tangent would keep the whole tangent graph behind it. Re-attaching a detached tangent
    at every module boundary bounds that graph to one module; the reverse graph of the primal is unchanged
    (``make_dual`` returns a view of the primal).
    """
    if isinstance(output, torch.Tensor):
        primal, tangent = fwAD.unpack_dual(output)
        if tangent is not None and tangent.requires_grad:
            return fwAD.make_dual(primal, tangent.detach())
    return None


@dataclass
class TeacherPass:
    """One θ0 forward of the linearized teacher, on the rows (positions) a loss reads.

    The pass may stop at the LM head's input (``head`` set): the head is linear, so ``f_lin = W·(h0 + α·ḣ) + b``
    takes one ``(N, V)`` matmul where ``W·h0 + α·W·ḣ`` takes two; the logits are computed when asked for.

    Attributes:
        rows: ``(B, T)`` bool, the positions whose logits were computed (row ``i`` of the logits is the ``i``-th
            ``True`` position in row-major order).
        base_out / tangent_out: on those rows, detached: ``f(x; θ0)`` and ``J f(x; θ0)·τ`` ``(N, V)``, or, with
            ``head``, the head's input at θ0 and its tangent ``(N, H)``.
        base_hidden / tangent_hidden: the requested hidden states at θ0 and their tangents, ``(B, T, H)``, detached.
        head: the frozen ``nn.Linear`` LM head when the outputs are its input, else ``None``.
    """

    rows: torch.Tensor
    base_out: torch.Tensor
    tangent_out: torch.Tensor
    base_hidden: tuple[torch.Tensor, ...]
    tangent_hidden: tuple[torch.Tensor, ...]
    head: torch.nn.Linear | None = None
    _root: torch.Tensor | None = None  # base_out with the θ0 reverse graph
    _captured: list[tuple[LoraLayer, torch.Tensor, torch.Tensor]] | None = None  # (layer, x_l, y_l) per LoRA layer
    _logits_at: tuple[float, torch.Tensor] | None = None  # (α, logits) kept by the loss: no second (N, V) matmul

    @property
    def base_logits(self) -> torch.Tensor:
        """``f(x; θ0)`` on the rows, ``(N, V)`` (also the DPO reference)."""
        if self.head is None:
            return self.base_out
        with torch.no_grad():
            return self.head(self.base_out)

    @property
    def tangent_logits(self) -> torch.Tensor:
        """``J f(x; θ0)·τ`` on the rows, ``(N, V)``."""
        if self.head is None:
            return self.tangent_out
        with torch.no_grad():
            return F.linear(self.tangent_out, self.head.weight)

    def logits(self, alpha: float = 1.0) -> torch.Tensor:
        """``f_lin(x; α·τ) = f(x; θ0) + α·J f(x; θ0)·τ`` on the rows, ``(N, V)``."""
        if self._logits_at is not None and self._logits_at[0] == alpha:
            return self._logits_at[1]
        point = torch.add(self.base_out, self.tangent_out, alpha=alpha)  # one pass, no α·T temporary
        if self.head is None:
            return point
        with torch.no_grad():
            return self.head(point)

    def hidden(self, alpha: float = 1.0) -> tuple[torch.Tensor, ...]:
        return tuple(h0 + alpha * dh for h0, dh in zip(self.base_hidden, self.tangent_hidden, strict=True))

    def full_logits(self, alpha: float = 1.0) -> torch.Tensor:
        """The linearized logits scattered into ``(B, T, V)``, zero off the rows (for metrics that index rows)."""
        logits = self.logits(alpha)
        full = logits.new_zeros((*self.rows.shape, logits.shape[-1]))
        full[self.rows] = logits
        return full


# LM heads whose output the model returns as its logits unchanged (no soft-capping or scaling after them), learnt on
# a model's first teacher pass (the output's identity); from the second on, the pass stops at the head's input.
_HEAD_OUTPUT_IS_LOGITS: weakref.WeakKeyDictionary[torch.nn.Module, bool] = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def _head_returns_its_input(head: torch.nn.Module) -> Iterator[None]:
    """The LM head passes its input through (after :func:`logits_on_rows`' row selection); restored on exit."""
    patched = vars(head).get("forward")  # e.g. frozen_linear_jvp's
    head.forward = _identity
    try:
        yield
    finally:
        if patched is None:
            del head.forward
        else:
            head.forward = patched


class _HeadShortcut:
    """Whether a teacher pass may stop at the LM head's input (:class:`TeacherPass`), and the means to learn it.

    Only a frozen ``nn.Linear`` head, outside autocast, whose output a previous pass saw the model return unchanged as
    its logits. :meth:`watch` (registered after every other hook of the pass, so it sees what they return) and
    :meth:`learn` record that on a model's first pass; from the next pass on :meth:`context` makes the head pass its
    input through.
    """

    def __init__(self, model: torch.nn.Module, base: torch.nn.Module) -> None:
        head = base.get_output_embeddings()
        frozen = _is_frozen_linear(head) and not autocast_enabled(model)
        self.head = head if frozen else None
        self.active = frozen and _HEAD_OUTPUT_IS_LOGITS.get(head) is True
        self._learning = frozen and head not in _HEAD_OUTPUT_IS_LOGITS
        self._outputs: list[torch.Tensor] = []

    def watch(self) -> list[torch.utils.hooks.RemovableHandle]:
        if not self._learning:
            return []
        return [self.head.register_forward_hook(lambda module, args, output: self._outputs.append(output))]

    def learn(self, logits: torch.Tensor) -> None:
        if self._outputs:
            _HEAD_OUTPUT_IS_LOGITS[self.head] = len(self._outputs) == 1 and logits is self._outputs[0]
            self._outputs.clear()

    def context(self) -> contextlib.AbstractContextManager:
        return _head_returns_its_input(self.head) if self.active else contextlib.nullcontext()


@contextlib.contextmanager
def logits_on_rows(model: torch.nn.Module, rows: torch.Tensor) -> Iterator[None]:
    """The LM head computes only the given rows: its input ``(B, T, H)`` becomes ``(N, H)``, the logits ``(N, V)``."""
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError("The model has no output embeddings (LM head); the linearized teacher needs one.")

    def select(module: torch.nn.Module, args: tuple) -> tuple:
        hidden = args[0]
        if hidden.shape[:2] != rows.shape:
            raise ValueError(
                f"The LM head got input {tuple(hidden.shape)}, expected (B, T, H) with (B, T) = {rows.shape}."
            )
        return (hidden[rows], *args[1:])

    handle = head.register_forward_pre_hook(select)
    try:
        yield
    finally:
        handle.remove()


def linearized_teacher_forward(
    model: PeftModel,
    inputs: Mapping[str, Any],
    adapter_name: str,
    rows: torch.Tensor,
    hidden_layers: Sequence[int] = (),
    *,
    forward_model: torch.nn.Module | None = None,
) -> TeacherPass:
    """``f(x; θ0)`` and ``J f(x; θ0)·τ`` of one adapter in ONE forward pass, keeping the reverse graph of the primal.

    The adapter's LoRA scaling is multiplied by a forward-mode dual number ``ε = 0 + 1·dε`` (every other adapter by
    0), so one forward at θ0 carries primal and tangent together. Unlike :func:`linearized_forward` + a second θ0
    forward (:func:`linearized_loss`), the primal's reverse graph is recorded during this same pass, and
    :func:`linearized_teacher_loss` backpropagates through it. Costs are cut where they are not needed:

    - frozen linear layers propagate tangents with one matmul (:func:`frozen_linear_jvp`);
    - the LM head runs on ``rows`` only (primal, tangent and its reverse pass), e.g. the supervised positions;
    - saved tensors drop their tangents, tangents are cut from the reverse graph at module boundaries, frozen
      weights get no zero tangent, and the tangents PyTorch pins beside saved inputs are released at each
      transformer block's exit (:class:`_SavedTangentRelease`; docs/ARCHITECTURE.md, "Cost");
    - SDPA calls (with grad mode on) run :class:`_FusedAttention`: fused kernels for the primal and its reverse pass,
      the tangent computed without a graph, so the graph holds no ``(L, S)`` attention matrix.

    The model runs in eval mode, and SDPA calls outside :class:`_FusedAttention` on its MATH kernel
    (:func:`jvp_safe_mode`); everything is restored. ``forward_model``: what runs the forward that keeps the graph,
    e.g. the DDP wrapper when no other forward of the step goes through it (``model`` by default). Call with grad
    mode on for training; under ``torch.no_grad()`` no graph is kept and :func:`linearized_teacher_loss` returns the
    value only.

    With activation checkpointing on (``model.activation_checkpointing_enable()``, a trainer's
    ``gradient_checkpointing=True``) the θ0 graph is not kept whole: the dual pass runs without a graph, and a second
    θ0 forward under non-reentrant checkpointing keeps each block's inputs only and recomputes the block in the
    backward (:func:`_checkpointed_blocks`). That is one more θ0 forward than checkpointing's usual recomputation,
    for the teacher's activation memory cut to one block's; the gradient is the same.
    """
    check_linear_lora(model, adapter_name)
    check_jvp_support(model)
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    is_encoder_decoder = bool(getattr(base.config, "is_encoder_decoder", False))
    kwargs = forward_kwargs(base, inputs, embed=True)
    kwargs["output_hidden_states"] = bool(hidden_layers)
    others = {name: 0.0 for layer in lora_layers(model) for name in layer.scaling if name != adapter_name}
    training = torch.is_grad_enabled()
    # Under activation checkpointing the dual pass keeps no graph, and a checkpointed θ0 forward records the one the
    # teacher's gradient needs: forward AD cannot run inside a checkpoint's recomputation (pytorch/functorch#993).
    checkpointed = _outermost_blocks(base, checkpointed_only=True) if training else []
    graph_in_pass = training and not checkpointed
    layers = lora_layers(model, adapter_name)
    layer_set = set(layers)
    captured: list[tuple[LoraLayer, torch.Tensor, torch.Tensor]] = []

    def capture(layer: LoraLayer, args: tuple, output: torch.Tensor) -> torch.Tensor:
        cut = _cut_tangent_graph(layer, args, output)
        output = output if cut is None else cut
        captured.append((layer, args[0].detach(), output))  # x_l at θ0 (detach() also drops its tangent)
        return output  # δ_l is taken at this tensor

    handles = []
    if graph_in_pass:
        skip = {base, getattr(base, "model", None)}
        handles += [
            m.register_forward_hook(_cut_tangent_graph) for m in base.modules() if m not in skip and m not in layer_set
        ]
        handles += [layer.register_forward_hook(capture) for layer in layers]
    shortcut = _HeadShortcut(model, base)
    handles += shortcut.watch()
    zero = torch.zeros((), dtype=torch.float32, device=next(model.parameters()).device)
    one = torch.ones_like(zero)
    saved = _SavedTangentRelease(base, keep_tangents=[one]) if graph_in_pass else contextlib.nullcontext()
    attention = _FusedAttentionMode() if graph_in_pass else contextlib.nullcontext()
    try:
        with jvp_safe_mode(model), logits_on_rows(base, rows):
            with (
                frozen_linear_jvp(model),
                fused_blocks(model),
                scaled_adapters(model, others),
                only_adapter(model, adapter_name),
                fwAD.dual_level(),
                saved,
                attention,
                torch.set_grad_enabled(graph_in_pass),
                shortcut.context(),
            ):
                with scaled_adapters(model, {adapter_name: fwAD.make_dual(zero, one)}):
                    outputs = (model if checkpointed else forward_model or model)(**kwargs)
                shortcut.learn(outputs.logits)
                logits = fwAD.unpack_dual(outputs.logits)
                hidden = hidden_states_of(outputs, is_encoder_decoder) if hidden_layers else ()
                hidden = [fwAD.unpack_dual(hidden[i]) for i in hidden_layers]
                tangent_out = logits.tangent.detach()  # logits' tangent, or the head input's
                base_hidden = tuple(h.primal.detach() for h in hidden)
                tangent_hidden = tuple(h.tangent.detach() for h in hidden)
                root = logits.primal
                del outputs, hidden, logits
            if checkpointed:
                with shortcut.context():
                    outputs, captured = _theta0_graph_forward(
                        model, kwargs, adapter_name, checkpointed=checkpointed, forward_model=forward_model
                    )
                root = outputs.logits
                if hidden_layers:  # the point the gradient is taken at (the kernels may differ in the last bits)
                    hidden = hidden_states_of(outputs, is_encoder_decoder)
                    base_hidden = tuple(hidden[i].detach() for i in hidden_layers)
                del outputs
    finally:
        for handle in handles:
            handle.remove()
    return TeacherPass(
        rows=rows,
        base_out=root.detach(),
        tangent_out=tangent_out,
        base_hidden=base_hidden,
        tangent_hidden=tangent_hidden,
        head=shortcut.head if shortcut.active else None,
        _root=root if training else None,
        _captured=captured if training else None,
    )


def linearized_teacher_loss(
    model: PeftModel,
    adapter_name: str,
    teacher: TeacherPass,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    alpha: float = 1.0,
) -> torch.Tensor:
    """``L(f_lin(x; α·τ))`` on the pass's rows, with the exact gradient w.r.t. the adapter's LoRA factors.

    With ``T = J f(θ0)·τ`` and ``u = ∂L/∂z`` at ``z = f(θ0) + α·T`` (``(N, V)``), the gradient is ``α·(∂T/∂θ_τ)ᵀ·u``
    (a pass that stopped at the LM head's input backpropagates ``u`` through the head first: ``α·Wᵀ·u``, ``(N, H)``).
    The adapter's output ``s·B_l·A_l·x_l`` enters each layer additively, so ``⟨T, α·u⟩ = Σ_l ⟨δ_l, s·B_l·A_l·x_l⟩``
    with ``δ_l = ∂⟨f(θ0), α·u⟩/∂y_l``: one reverse pass through the pass's θ0 graph gives every ``δ_l``, and
    :func:`lora_factor_gradients` turns them into ``G_A``, ``G_B``. The returned tensor has the value of ``L`` and the
    gradient of ``Σ_l ⟨G_A,l, A_l⟩ + ⟨G_B,l, B_l⟩`` (``G`` fixed), i.e. exactly ``∂L/∂A_l = G_A,l``, ``∂L/∂B_l = G_B,l``.
    ``loss_fn`` maps ``(N, V)`` logits to a scalar. Consumes the pass's graph (a second call raises).
    """
    if teacher._captured is None or not torch.is_grad_enabled():  # evaluation: the value is all that is needed
        return loss_fn(teacher.logits(alpha))
    if teacher._root is None:
        raise ValueError("This TeacherPass has no θ0 graph left: its loss was already taken.")
    if teacher.head is None:
        point = logits = teacher.logits(alpha).requires_grad_(True)
    else:  # the pass stopped at the head's input: f_lin = head(h0 + α·ḣ), and the cotangent is taken at h0 + α·ḣ
        point = torch.add(teacher.base_out, teacher.tangent_out, alpha=alpha).requires_grad_(True)
        logits = teacher.head(point)
    loss = loss_fn(logits)
    # α·u, with α folded into the loss's backward (a scalar there) rather than applied to the (N, V) cotangent
    (cotangent,) = torch.autograd.grad(loss, point, grad_outputs=torch.full_like(loss, alpha))
    teacher._logits_at = (alpha, logits.detach())
    captured, root = teacher._captured, teacher._root
    teacher._captured, teacher._root = [], None  # consumed: the graph is freed as soon as δ_l are taken
    deltas = torch.autograd.grad(root, [y for _, _, y in captured], grad_outputs=cotangent, allow_unused=True)
    surrogate = loss.new_zeros(())
    for (layer, x, _), delta in zip(captured, deltas, strict=True):
        if delta is None:  # the layer does not reach the rows' logits (e.g. an unused branch)
            continue
        lora_a, lora_b = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        with torch.no_grad():
            grad_a, grad_b = lora_factor_gradients(x, delta, lora_a, lora_b, layer.scaling[adapter_name])
        surrogate = surrogate + ((grad_a * lora_a).sum() + (grad_b * lora_b).sum()).to(surrogate.dtype)
    return loss.detach() + surrogate - surrogate.detach()


# ---- opt-in cheaper teacher: the tangent by a finite difference (docs/ARCHITECTURE.md, "Cheaper teachers") ---------


def relative_adapter_size(model: torch.nn.Module, adapter_name: str) -> float:
    """``ρ = sqrt(mean_l ‖s_l·B_l·A_l‖_F² / ‖W_l‖_F²)``: the RMS over the adapter's layers of its update's size relative
    to the frozen weight it adds to, at the adapter's nominal scaling ``s_l``.

    ``‖B·A‖_F² = tr(BᵀB·A·Aᵀ)`` (r×r products, no ``d_out×d_in`` matrix is formed).
    """
    ratios = []
    with torch.no_grad():
        for layer in lora_layers(model, adapter_name):
            a = layer.lora_A[adapter_name].weight.double()
            b = layer.lora_B[adapter_name].weight.double()
            weight = layer.get_base_layer().weight.double()
            update_sq = ((b.T @ b) * (a @ a.T)).sum() * nominal_scaling(layer, adapter_name) ** 2
            ratios.append(update_sq / weight.pow(2).sum().clamp_min(torch.finfo(torch.float64).tiny))
    return torch.stack(ratios).mean().sqrt().item() if ratios else 0.0


def finite_difference_step(rho: float, dtype: torch.dtype) -> float:
    """The forward-difference step ``ε = sqrt(u)/ρ`` for an adapter of relative size ``ρ`` in precision ``u``.

    ``D_ε = (f(θ0 + ε·τ) − f(θ0))/ε = J·τ + (ε/2)·f''[τ, τ] + O(ε²)``, and each forward carries a rounding error
    ``≈ κ·u·‖f‖``. With ``‖J·τ‖ ∝ ρ·‖f‖`` and ``‖f''[τ, τ]‖ ∝ ρ²·‖f‖``, the relative error is
    ``≈ c₁·(ε·ρ) + c₂·u/(ε·ρ)``: it depends on the relative weight perturbation ``δ = ε·ρ`` only and is smallest at
    ``δ ≈ sqrt(u)`` (3.5e-4 in fp32; measured optima: 3e-4 on SmolLM2-135M, 3e-4 to 1e-3 on tiny Llama/T5), where it
    is ``O(sqrt(u))`` times the network's conditioning (≈ 1e-3 relative, measured). ``u`` is never taken below fp32's:
    transformers' RMSNorm/LayerNorm compute in fp32 even in an fp64 model, and with fp64's ``sqrt(u)`` = 1.5e-8 that
    fp32 rounding swamps the difference (measured: relative error > 1). For a model that is fp64 throughout pass a
    smaller ``eps`` yourself. ``ρ = 0`` (a zero adapter, e.g. PEFT's ``B = 0`` init) has a zero tangent whatever
    ``ε``: ``ε = 1``.
    """
    if rho <= 0.0:
        return 1.0
    unit = max(torch.finfo(dtype).eps, torch.finfo(torch.float32).eps)
    return unit**0.5 / rho


def finite_difference_teacher_forward(
    model: PeftModel,
    inputs: Mapping[str, Any],
    adapter_name: str,
    rows: torch.Tensor,
    hidden_layers: Sequence[int] = (),
    *,
    eps: float | None = None,
    forward_model: torch.nn.Module | None = None,
) -> TeacherPass:
    """``f(x; θ0)`` exactly and ``J f(x; θ0)·τ ≈ (f(x; θ0 + ε·τ) − f(x; θ0))/ε``: two plain forwards, no forward-mode AD.

    A drop-in for :func:`linearized_teacher_forward` (same :class:`TeacherPass`, same
    :func:`linearized_teacher_loss`), for fp32/fp64 computations only: the difference cancels ``≈ −log10(ε·ρ)``
    digits, so bf16/fp16/TF32 would leave no correct digit (the configs refuse them).

    - The perturbed forward at ``θ0 + ε·τ`` runs without a graph, first (its activations are freed at once).
    - The θ0 forward keeps its reverse graph and the (x_l, y_l) of every LoRA layer of the adapter, exactly as the
      exact pass does, so :func:`linearized_teacher_loss` gives the gradient ``α·(∂(J·τ)/∂θ_τ)ᵀ·u`` with the
      Jacobian at θ0, ``u = ∂L/∂z`` taken at the approximate ``z = f(θ0) + α·D_ε``. This is the gradient of the
      linearized model (the tangent-space gradient the method defines) at a slightly wrong point, not the gradient of
      ``L(f(θ0) + α·D_ε)``, whose Jacobian would sit at ``θ0 + ε·τ``: its error is that of ``u`` alone, first order in
      the tangent's error, and it costs no pass beyond the θ0 forward every teacher needs.
    - A forward (one-sided) difference, not a central one: central needs ``f(θ0 + ε·τ)`` and ``f(θ0 − ε·τ)`` besides
      the θ0 pass with graph (the primal is the DPO reference and the point the gradient is taken at), i.e. three
      forwards, which costs about what the one-pass JVP costs; one-sided needs two.

    Both forwards run in eval mode and SDPA on its fused kernels, as the exact pass's primal
    (:class:`_FusedAttention`): they must be the same function of θ. Under activation checkpointing the θ0 forward is
    checkpointed block by block, non-reentrant so that ``y_l`` stay nodes of the graph (:func:`_checkpointed_blocks`).

    Args:
        eps: the step ``ε`` (a multiplier of the adapter's scaling); ``None`` picks
            ``finite_difference_step(relative_adapter_size(model, adapter_name), dtype)``.
        model, inputs, adapter_name, rows, hidden_layers, forward_model: as for :func:`linearized_teacher_forward`.
    """
    check_linear_lora(model, adapter_name)
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    is_encoder_decoder = bool(getattr(base.config, "is_encoder_decoder", False))
    kwargs = forward_kwargs(base, inputs, embed=True)
    kwargs["output_hidden_states"] = bool(hidden_layers)
    layers = lora_layers(model, adapter_name)
    if eps is None:
        eps = finite_difference_step(
            relative_adapter_size(model, adapter_name), layers[0].get_base_layer().weight.dtype
        )
    others = {name: 0.0 for layer in lora_layers(model) for name in layer.scaling if name != adapter_name}
    training = torch.is_grad_enabled()
    checkpointed = _outermost_blocks(base, checkpointed_only=True) if training else []

    def outputs_of(outputs: Any) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        hidden = hidden_states_of(outputs, is_encoder_decoder) if hidden_layers else ()
        return outputs.logits, tuple(hidden[i] for i in hidden_layers)

    shortcut = _HeadShortcut(model, base)  # both forwards stop at the head's input, or neither does
    handles = shortcut.watch()
    try:
        with (
            jvp_safe_mode(model),
            sdpa_kernel(_FUSED_FIRST, set_priority=True),  # no forward-mode AD here: the exact pass's primal kernels
            logits_on_rows(base, rows),
            shortcut.context(),
        ):
            with (
                torch.no_grad(),
                scaled_adapters(model, {**others, adapter_name: eps}),
                only_adapter(model, adapter_name),
            ):
                outputs = model(**kwargs)
            shortcut.learn(outputs.logits)
            perturbed_out, perturbed_hidden = outputs_of(outputs)
            outputs, captured = _theta0_graph_forward(
                model, kwargs, adapter_name, checkpointed=checkpointed, forward_model=forward_model
            )
            root, hidden = outputs_of(outputs)
            del outputs
    finally:
        for handle in handles:
            handle.remove()
    base_out = root.detach()
    base_hidden = tuple(h.detach() for h in hidden)
    return TeacherPass(
        rows=rows,
        base_out=base_out,
        tangent_out=(perturbed_out - base_out) / eps,
        base_hidden=base_hidden,
        tangent_hidden=tuple((h - h0) / eps for h, h0 in zip(perturbed_hidden, base_hidden, strict=True)),
        head=shortcut.head if shortcut.active else None,
        _root=root if training else None,
        _captured=captured if training else None,
    )
