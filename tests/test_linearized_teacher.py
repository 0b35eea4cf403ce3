"""The one-pass linearized teacher (``linearized_teacher_forward`` + ``linearized_teacher_loss``) against backprop
through the JVP, in fp64, on a tiny Llama and a tiny T5 built from random configs."""

import contextlib

import pytest
import torch
from conftest import make_student_and_teacher
from peft.tuners.lora import LoraLayer
from torch.testing import assert_close
from transformers.modeling_layers import GradientCheckpointingLayer

import delta_trl.core.fused_blocks as fused_blocks_module
from delta_trl.core.adapters import scaled_adapters, unparked
from delta_trl.core.linearize import (
    _SavedTangentRelease,
    finite_difference_teacher_forward,
    frozen_linear_jvp,
    linearized_forward,
    linearized_teacher_forward,
    linearized_teacher_loss,
)
from delta_trl.core.losses import completion_logps, dpo_loss, token_cross_entropy
from delta_trl.core.rows import row_targets, rows_cross_entropy, rows_sequence_logps


def _peft(kind: str, attn: str = "sdpa"):
    return make_student_and_teacher(kind, attn=attn)


def _inputs(kind: str):
    torch.manual_seed(2)
    ids = torch.randint(2, 300, (2, 6))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    if kind == "t5":
        labels = torch.randint(2, 300, (2, 4))
        labels[1, 3] = -100
    else:
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, :2] = -100  # a prompt
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("blocks", ["fused", "pytorch"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_one_pass_teacher_gradient_equals_backprop_through_the_jvp(kind, attn, blocks, monkeypatch):
    if blocks == "pytorch":  # PyTorch's own rules everywhere but the linear layers and SDPA
        monkeypatch.setattr(fused_blocks_module, "_fused_forward", lambda module: None)
        monkeypatch.setattr(fused_blocks_module, "_fused_rotary_functions", lambda model: contextlib.nullcontext())
    # Llama's RMSNorm computes in fp32 even in an fp64 model, where the fused rule and PyTorch's round differently
    fp32_norms = kind == "llama" and blocks == "fused"
    model = _peft(kind, attn)
    inputs = _inputs(kind)
    shift = kind == "llama"
    labels = inputs["labels"]
    rows, targets = row_targets(labels, shift=shift)
    alpha, num_items = 1.3, 7
    teacher = [p for n, p in model.named_parameters() if ".teacher." in n]
    student = [p for n, p in model.named_parameters() if ".default." in n]
    model.train()
    with unparked(model, "teacher"):
        lin = linearized_forward(model, inputs, "teacher", (-1,))  # graph through the tangent
        reference = token_cross_entropy(lin.logits(alpha), labels, shift=shift, num_items=num_items)
        expected = torch.autograd.grad(reference, teacher)
        one_pass = linearized_teacher_forward(model, inputs, "teacher", rows, (-1,))
        loss = linearized_teacher_loss(
            model, "teacher", one_pass, lambda z: rows_cross_entropy(z, targets, num_items), alpha
        )
        got = torch.autograd.grad(loss, teacher + student, allow_unused=True)
    assert model.training  # the state is restored
    tolerance = 1e-5 if fp32_norms else 1e-12
    assert_close(loss, reference.detach(), rtol=tolerance, atol=tolerance)
    assert max(g.abs().max() for g in expected) > 1e-3
    error = max((g - e).abs().max().item() for g, e in zip(got, expected, strict=False))
    print(f"{kind}/{attn}/{blocks}: max |grad error| = {error:.2e}")
    # Llama's eager attention takes its softmax in fp32 even in an fp64 model: ~1e-9 there, rounding elsewhere
    assert error < (1e-6 if fp32_norms else 1e-8 if (kind, attn) == ("llama", "eager") else 1e-14)
    assert all(g is None or g.abs().max() == 0 for g in got[len(teacher) :])  # the student gets nothing
    full = lin.logits(alpha).detach()
    assert_close(one_pass.logits(alpha), full[rows], rtol=tolerance, atol=tolerance)
    assert_close(one_pass.full_logits(alpha)[rows], full[rows], rtol=tolerance, atol=tolerance)
    assert_close(one_pass.hidden(alpha)[0], lin.hidden(alpha)[0].detach(), rtol=tolerance, atol=tolerance)
    with pytest.raises(ValueError, match="no θ0 graph"):
        linearized_teacher_loss(model, "teacher", one_pass, lambda z: z.sum(), alpha)


def test_one_pass_teacher_without_grad_keeps_no_graph_and_gives_the_value():
    model = _peft("llama")
    inputs = _inputs("llama")
    rows, targets = row_targets(inputs["labels"], shift=True)
    with unparked(model, "teacher"), torch.no_grad():
        one_pass = linearized_teacher_forward(model, inputs, "teacher", rows)
        value = linearized_teacher_loss(model, "teacher", one_pass, lambda z: rows_cross_entropy(z, targets), 0.5)
        lin = linearized_forward(model, inputs, "teacher")
    assert not value.requires_grad
    assert_close(value, token_cross_entropy(lin.logits(0.5), inputs["labels"], shift=True))


def test_frozen_linear_rule_is_bit_identical_and_leaves_nothing_patched():
    model = _peft("llama")
    inputs = _inputs("llama")
    with unparked(model, "teacher"), torch.no_grad():
        lin = linearized_forward(model, inputs, "teacher")  # the rule is on without a graph
        with frozen_linear_jvp(model):
            patched = [m for m in model.modules() if "forward" in vars(m)]
    assert patched
    assert not [m for m in model.modules() if "forward" in vars(m)]
    with unparked(model, "teacher"):
        reference = linearized_forward(model, inputs, "teacher")  # graph kept: PyTorch's own rule
    assert torch.equal(lin.tangent_logits, reference.tangent_logits.detach())


def _peak_live_bytes(fn) -> int:
    """Peak of live tracked CPU allocations while ``fn`` runs (the PyTorch profiler's allocation events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def test_frozen_linear_rule_gives_the_frozen_weight_no_tangent():
    """A materialised zero tangent for the weight would cost the weight's size per layer (the LM head's, 113 MB on
    SmolLM2), alive until the dual level closes; one row through a 1024 × 1024 layer must stay far below 4 MiB."""
    import torch.autograd.forward_ad as fwAD

    layer = torch.nn.Linear(1024, 1024).requires_grad_(False)
    scale = torch.ones((), requires_grad=True)  # grad mode records the reverse graph, as in the teacher pass

    def dual_forward():
        with frozen_linear_jvp(layer), fwAD.dual_level():
            x = fwAD.make_dual(torch.randn(1, 1024), torch.randn(1, 1024)) * scale
            fwAD.unpack_dual(layer(x)).tangent.sum().backward()

    weight_bytes = layer.weight.numel() * layer.weight.element_size()
    assert _peak_live_bytes(dual_forward) < weight_bytes / 4


def test_row_losses_equal_the_full_tensor_losses():
    torch.manual_seed(0)
    logits = torch.randn(4, 7, 11, dtype=torch.float64)
    labels = torch.randint(0, 11, (4, 7))
    labels[:, :3] = -100
    labels[2, 5:] = -100
    rows, targets = row_targets(labels, shift=True)
    assert_close(rows_cross_entropy(logits[rows], targets), token_cross_entropy(logits, labels, shift=True))
    assert_close(
        rows_cross_entropy(logits[rows], targets, 5), token_cross_entropy(logits, labels, shift=True, num_items=5)
    )
    assert_close(rows_sequence_logps(logits[rows], targets, rows), completion_logps(logits, labels))
    rows, targets = row_targets(labels, shift=False)
    assert_close(rows_cross_entropy(logits[rows], targets), token_cross_entropy(logits, labels, shift=False))
    chosen, rejected = rows_sequence_logps(logits[rows], targets, rows).chunk(2)
    assert dpo_loss(chosen, rejected, chosen, rejected, beta=0.1).losses.shape == (2,)


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_saved_tangents_are_released_at_each_layer_exit_and_the_gradient_is_unchanged(kind, monkeypatch):
    """Each block's saved tangents are freed when it returns (they would otherwise live until the dual level closes,
    ~2× a forward's activations); the teacher's gradient is bit-identical to keeping them, and the pass's peak is
    lower (the tangents' share of the peak grows with depth: SmolLM2-135M's step went from 1.83× to 1.20× LoRA's)."""
    model = _peft(kind)
    model.train()
    inputs = _inputs(kind)
    rows, targets = row_targets(inputs["labels"], shift=kind == "llama")
    teacher = [p for n, p in model.named_parameters() if ".teacher." in n]

    def teacher_gradient():
        with unparked(model, "teacher"):
            one_pass = linearized_teacher_forward(model, inputs, "teacher", rows, (-1,))
            loss = linearized_teacher_loss(model, "teacher", one_pass, lambda z: rows_cross_entropy(z, targets), 1.3)
            return torch.autograd.grad(loss, teacher)

    released = []
    release = _SavedTangentRelease._exit

    def counting_release(self, module, args, kwargs, output):
        saved = self.open[-1][1]
        before = sum(t.untyped_storage().nbytes() for t in saved)
        release(self, module, args, kwargs, output)
        released.append(before - sum(t.untyped_storage().nbytes() for t in saved))

    monkeypatch.setattr(_SavedTangentRelease, "_exit", counting_release)
    peak_released = _peak_live_bytes(teacher_gradient)
    got = teacher_gradient()
    blocks = len(released) // 2
    assert blocks == sum(isinstance(m, GradientCheckpointingLayer) for m in model.modules())  # every block, once
    assert all(r > 0 for r in released)

    monkeypatch.setattr(_SavedTangentRelease, "_exit", lambda self, *args: self.open.pop() and None)
    peak_kept = _peak_live_bytes(teacher_gradient)
    expected = teacher_gradient()
    assert all(torch.equal(g, e) for g, e in zip(got, expected, strict=True))
    print(f"{kind}: peak {peak_released} B released vs {peak_kept} B kept, {sum(released) // 2} B freed per pass")
    assert peak_released < peak_kept


@pytest.mark.parametrize(
    "options",
    [
        {"is_causal": True, "enable_gqa": True},
        {"mask": "padding", "enable_gqa": True},  # two rows of the second sequence attend to nothing
        {"mask": "float", "enable_gqa": True, "scale": 0.3},
        {"mask": "padding"},
        {"mask": "per-head", "enable_gqa": True, "only": (1, 2)},  # a (B, H, L, S) mask; no query tangent
        {"mask": "2d-float", "enable_gqa": True, "only": (0,)},
        {"is_causal": True, "enable_gqa": True, "length": 3, "only": (2,)},  # L < S: upper-left causal
    ],
    ids=[
        "causal-gqa",
        "bool-mask-gqa",
        "float-mask-scale",
        "bool-mask",
        "head-mask-gqa-kv",
        "2d-mask-q",
        "causal-3x5-v",
    ],
)
def test_fused_attention_rule_equals_the_math_kernel_in_primal_tangent_and_gradient(options):
    """``_FusedAttention`` (fused primal, explicit tangent, recomputed fused backward) against PyTorch's own MATH
    kernel under forward AD, fp64: the same output, tangent (``attention_tangent``) and input gradients."""
    import torch.autograd.forward_ad as fwAD
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from delta_trl.core.linearize import _FusedAttention, _FusedAttentionMode

    torch.manual_seed(0)
    heads, kv_heads = 4, (2 if options.get("enable_gqa") else 4)
    length = options.get("length", 5)
    q = torch.randn(2, heads, length, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, kv_heads, 5, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    # the inputs without a tangent get an exact zero one (forward AD's own rule skips the term, as ours does)
    tangents = [torch.randn_like(t) if i in options.get("only", (0, 1, 2)) else None for i, t in enumerate((q, k, v))]
    kwargs = {key: value for key, value in options.items() if key in ("is_causal", "enable_gqa", "scale")}
    if options.get("mask") == "padding":
        mask = torch.ones(2, 1, 5, 5, dtype=torch.bool).tril()
        mask[1, :, :, :2] = False
        kwargs["attn_mask"] = mask
    elif options.get("mask") == "float":
        kwargs["attn_mask"] = torch.randn(2, 1, 5, 5, dtype=torch.float64)
    elif options.get("mask") == "per-head":
        kwargs["attn_mask"] = torch.rand(2, heads, 5, 5) > 0.3
        kwargs["attn_mask"][0, 1, 2] = False  # a row of one head attends to nothing
    elif options.get("mask") == "2d-float":
        kwargs["attn_mask"] = torch.randn(5, 5, dtype=torch.float64)
    calls = []

    def run(fused: bool):
        spy = contextlib.nullcontext()
        if fused:
            spy = _FusedAttentionMode()
            original = _FusedAttention.apply
            _FusedAttention.apply = lambda *a: calls.append(1) or original(*a)
        try:
            with sdpa_kernel(SDPBackend.MATH), fwAD.dual_level(), spy:
                duals = [t if d is None else fwAD.make_dual(t, d) for t, d in zip((q, k, v), tangents, strict=True)]
                out = fwAD.unpack_dual(F.scaled_dot_product_attention(*duals, **kwargs))
                return out.primal, out.tangent.detach()
        finally:
            if fused:
                _FusedAttention.apply = original

    expected, expected_tangent = run(fused=False)
    got, got_tangent = run(fused=True)
    assert calls == [1]
    assert not got_tangent.isnan().any()
    assert_close(got_tangent, expected_tangent, rtol=1e-12, atol=1e-13)
    assert_close(got.detach(), expected.detach(), rtol=1e-12, atol=1e-13)
    cotangent = torch.randn_like(expected)
    got_grads = torch.autograd.grad(got, (q, k, v), cotangent)
    for a, b in zip(got_grads, torch.autograd.grad(expected, (q, k, v), cotangent), strict=True):
        assert_close(a, b, rtol=1e-12, atol=1e-13)


def test_fused_attention_mode_leaves_a_trainable_mask_to_pytorch(monkeypatch):
    """The rule gives the mask no gradient, so a mask that needs one keeps PyTorch's own SDPA (and gets it)."""
    import torch.autograd.forward_ad as fwAD
    import torch.nn.functional as F

    from delta_trl.core.linearize import _FusedAttention, _FusedAttentionMode

    monkeypatch.setattr(_FusedAttention, "apply", lambda *a: pytest.fail("routed to the fused rule"))
    q, k, v = (torch.randn(1, 2, 4, 8, dtype=torch.float64) for _ in range(3))
    bias = torch.zeros(1, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(1, 2, 4, 8, dtype=torch.float64)
    with fwAD.dual_level(), _FusedAttentionMode():
        out = F.scaled_dot_product_attention(fwAD.make_dual(q, torch.randn_like(q)), k, v, attn_mask=bias)
    (grad,) = torch.autograd.grad((fwAD.unpack_dual(out).primal * weights).sum(), bias)
    (expected,) = torch.autograd.grad((F.scaled_dot_product_attention(q, k, v, attn_mask=bias) * weights).sum(), bias)
    assert expected.abs().max() > 1e-3
    assert_close(grad, expected)


def _switch_dropout_on(model, p: float = 0.2) -> None:
    """Dropout everywhere it can act in train mode: T5's modules, Llama's functional attention dropout."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = p


@pytest.mark.parametrize("tangent", ["jvp", "fd"])
@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_activation_checkpointing_is_honoured_by_the_teacher_pass(kind, tangent):
    """Under activation checkpointing the teacher's θ0 graph keeps only each checkpointed block's inputs and
    recomputes the block in the backward. By then the model is back in train mode (dropout on) with the student at a
    training scale, so the recomputation must re-enter the pass's own state (eval, every adapter at 0): the gradient
    equals the unchecked pass's, and the pass's peak memory is lower. transformers' reentrant variant is asked for
    (the teacher's blocks are checkpointed non-reentrant whatever it is), and ``every_n_layers`` is honoured."""
    model = _peft(kind)
    _switch_dropout_on(model)
    model.train()
    torch.manual_seed(3)
    ids = torch.randint(2, 300, (4, 48))
    labels = torch.randint(2, 300, (4, 48)) if kind == "t5" else ids.clone()
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    rows, targets = row_targets(labels, shift=kind == "llama")
    teacher = [p for n, p in model.named_parameters() if ".teacher." in n]
    forward = linearized_teacher_forward if tangent == "jvp" else finite_difference_teacher_forward
    blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    recomputed = []
    stopped_at_head = []  # the pass stops at the LM head's input from its second call on, checkpointed or not
    backward = False
    for block in blocks:  # a LoRA layer inside: checkpoints recompute `forward`, so the block's own hooks stay out
        first = next(m for m in block.modules() if isinstance(m, LoraLayer))
        first.register_forward_hook(lambda *_, block=block: recomputed.append(block) if backward else None)

    def teacher_gradient():
        nonlocal backward
        recomputed.clear()
        with unparked(model, "teacher"):
            one_pass = forward(model, inputs, "teacher", rows, (-1,))
            stopped_at_head.append(one_pass.head is not None)
            with scaled_adapters(model, {"default": 1.7}):  # as if the student's scale had moved in between
                backward = True  # the θ0 backward runs inside the loss (it takes δ_l)
                loss = linearized_teacher_loss(
                    model, "teacher", one_pass, lambda z: rows_cross_entropy(z, targets), 1.3
                )
                grads = torch.autograd.grad(loss, teacher)
                backward = False
        return loss.detach(), one_pass.tangent_hidden[0], grads

    peak_plain = _peak_live_bytes(teacher_gradient)
    loss, tangent_hidden, expected = teacher_gradient()
    assert not recomputed
    assert max(g.abs().max() for g in expected) > 1e-3
    base = model.get_base_model()
    for options in ({"activation_checkpointing_kwargs": {"use_reentrant": True}}, {"every_n_layers": 2}):
        base.activation_checkpointing_enable(**options)
        checkpointed = [m for m in blocks if m.gradient_checkpointing]
        peak_checkpointed = _peak_live_bytes(teacher_gradient)
        got_loss, got_tangent_hidden, got = teacher_gradient()

        assert model.training
        assert all(m.gradient_checkpointing for m in checkpointed)  # restored
        assert not [m for m in blocks if "forward" in vars(m)]  # nothing left patched
        assert sorted(map(id, recomputed)) == sorted(map(id, checkpointed))  # each checkpointed block, once
        assert_close(got_loss, loss, rtol=1e-12, atol=0)
        assert_close(got_tangent_hidden, tangent_hidden, rtol=1e-12, atol=1e-12)
        error = max(((g - e).abs().max() / e.abs().max()).item() for g, e in zip(got, expected, strict=True))
        print(f"{kind}/{tangent}/{options}: {len(checkpointed)} of {len(blocks)} blocks checkpointed, max relative "
              f"grad error {error:.1e}, peak {peak_checkpointed} B vs {peak_plain} B")  # fmt: skip
        assert error < 1e-12
        assert peak_checkpointed < peak_plain
        assert stopped_at_head[1:] == [True] * (len(stopped_at_head) - 1)
        base.activation_checkpointing_disable()
    assert 0 < len(checkpointed) < len(blocks)  # every_n_layers=2 left some blocks out


@pytest.mark.parametrize("tangent", ["jvp", "fd"])
@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_the_pass_stops_at_the_heads_input_only_where_the_heads_output_is_the_logits(kind, tangent):
    """A model's first teacher pass learns whether its LM head's output is its logits; from the second on the pass
    stops at the head's input and ``f_lin = W·(h0 + α·ḣ)`` (one (N, V) matmul). Same loss, gradient and logits (the
    FD teacher's difference is taken at the head's input then: the same up to rounding divided by ε)."""
    inputs = _inputs(kind)
    rows, targets = row_targets(inputs["labels"], shift=kind == "llama")
    forward = linearized_teacher_forward if tangent == "jvp" else finite_difference_teacher_forward
    tolerance = 1e-12 if tangent == "jvp" else 1e-8

    def run(model):
        teacher = [p for n, p in model.named_parameters() if ".teacher." in n]
        with unparked(model, "teacher"):
            one_pass = forward(model, inputs, "teacher", rows, (-1,))
            loss = linearized_teacher_loss(model, "teacher", one_pass, lambda z: rows_cross_entropy(z, targets), 1.3)
            grads = torch.autograd.grad(loss, teacher)
        return one_pass, loss, grads

    model = _peft(kind)
    first, loss, grads = run(model)
    second, loss_2, grads_2 = run(model)
    assert first.head is None
    assert second.head is model.get_base_model().get_output_embeddings()
    assert second.base_out.shape[-1] == (model.config.d_model if kind == "t5" else model.config.hidden_size)
    assert_close(loss_2, loss, rtol=tolerance, atol=tolerance)
    for a, b in zip(grads_2, grads, strict=True):
        assert_close(a, b, rtol=tolerance, atol=tolerance)
    for get in (lambda p: p.base_logits, lambda p: p.tangent_logits, lambda p: p.logits(0.4), lambda p: p.logits(1.3)):
        assert_close(get(second), get(first), rtol=tolerance, atol=tolerance)
    assert_close(second.full_logits(1.3)[rows], first.logits(1.3), rtol=tolerance, atol=tolerance)

    # logits changed after the head (as soft-capping or a logit scale would): the pass keeps computing them whole
    scaled = _peft(kind)
    scaled.get_base_model().register_forward_hook(
        lambda module, args, output: output.__setitem__("logits", 2 * output.logits)
    )
    for _ in range(2):
        one_pass, _, _ = run(scaled)
        assert one_pass.head is None
    assert_close(one_pass.logits(1.3), 2 * first.logits(1.3), rtol=tolerance, atol=tolerance)  # same weights, scaled
