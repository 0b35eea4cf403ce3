"""The teacher pass's fused RMSNorm and SiLU-gate rules (``delta_trl/core/fused_blocks.py``) against the Jacobian
in fp64 and against PyTorch's own rules on the modules they replace."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import transformers.models.llama.modeling_llama as modeling_llama
from torch.testing import assert_close
from transformers import LlamaConfig, Qwen2Config
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP, Qwen2RMSNorm
from transformers.models.t5.modeling_t5 import T5LayerNorm

from delta_trl.core.fused_blocks import _SiluGate, fused_blocks, fused_rotary, rms_normalize_jvp, rotate_half


def _dual_run(module: torch.nn.Module, x: torch.Tensor, tangent: torch.Tensor, cotangent: torch.Tensor):
    """(output, tangent, input gradient) of ``module`` at ``x`` under forward AD with the reverse graph kept."""
    x = x.clone().requires_grad_(True)
    with fwAD.dual_level():
        primal, out_tangent = fwAD.unpack_dual(module(fwAD.make_dual(x, tangent)))
        out_tangent = out_tangent.detach().clone()
    (grad,) = torch.autograd.grad(primal, x, cotangent)
    return primal.detach(), out_tangent, grad


def test_rms_normalize_jvp_is_the_jacobian_and_its_transpose():
    torch.manual_seed(0)
    x, v = torch.randn(2, 3, 7, dtype=torch.float64), torch.randn(2, 3, 7, dtype=torch.float64)
    eps = 1e-2

    def normalize(t):
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps)

    inv_rms = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    _, expected = torch.func.jvp(normalize, (x,), (v,))
    assert_close(rms_normalize_jvp(x, inv_rms, v), expected, rtol=1e-13, atol=1e-13)
    _, pullback = torch.func.vjp(normalize, x)
    assert_close(rms_normalize_jvp(x, inv_rms, v), pullback(v)[0], rtol=1e-13, atol=1e-13)  # J is symmetric
    # by hand, one row of two: x = (3, 4), eps = 0: r = 1/sqrt(12.5), J·(1, 0) = r·((1, 0) − x·r²·3/2)
    r = 12.5**-0.5
    got = rms_normalize_jvp(torch.tensor([[3.0, 4.0]]), torch.tensor([[r]]), torch.tensor([[1.0, 0.0]]))
    assert_close(got, torch.tensor([[r * (1 - 3 * 1.5 / 12.5), -r * 4 * 1.5 / 12.5]]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_rule_has_the_modules_primal_and_its_tangent_and_gradient(dtype):
    torch.manual_seed(0)
    norm = LlamaRMSNorm(16, eps=1e-5).to(dtype).requires_grad_(False)
    norm.weight.uniform_(0.5, 1.5)
    x, tangent, cotangent = (torch.randn(3, 5, 16, dtype=dtype) for _ in range(3))
    expected = _dual_run(norm, x, tangent, cotangent)
    with fused_blocks(norm):
        assert "forward" in vars(norm)
        got = _dual_run(norm, x, tangent, cotangent)
    assert "forward" not in vars(norm)
    assert torch.equal(got[0], expected[0])  # the module's own ops: bit-identical
    # the module computes in fp32 whatever the input dtype; the two rules round differently there
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    assert_close(got[1], expected[1], rtol=tolerance, atol=tolerance)
    assert_close(got[2], expected[2], rtol=tolerance, atol=tolerance)


def test_silu_gate_rule_equals_pytorchs_in_fp64():
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=8, intermediate_size=12, num_attention_heads=2, num_key_value_heads=1)
    mlp = LlamaMLP(config).double().requires_grad_(False)
    x, tangent, cotangent = (torch.randn(2, 3, 8, dtype=torch.float64) for _ in range(3))
    expected = _dual_run(mlp, x, tangent, cotangent)
    with fused_blocks(mlp):
        got = _dual_run(mlp, x, tangent, cotangent)
    assert torch.equal(got[0], expected[0])
    assert_close(got[1], expected[1], rtol=1e-13, atol=1e-14)
    assert_close(got[2], expected[2], rtol=1e-13, atol=1e-14)
    # one input without a tangent, one without a gradient: the rule's None branches
    gate, up = torch.randn(4, 12, dtype=torch.float64), torch.randn(4, 12, dtype=torch.float64)
    gate.requires_grad_(True)
    for gate_tangent, up_tangent in ((torch.ones_like(gate), None), (None, torch.ones_like(up))):
        with fwAD.dual_level():
            dual_gate = gate if gate_tangent is None else fwAD.make_dual(gate, gate_tangent)
            dual_up = up if up_tangent is None else fwAD.make_dual(up, up_tangent)
            out = fwAD.unpack_dual(_SiluGate.apply(dual_gate, dual_up)).tangent
        silu = torch.nn.functional.silu(gate.detach())
        sigmoid = torch.sigmoid(gate.detach())
        expected_tangent = sigmoid * (1 + gate.detach() * (1 - sigmoid)) * up if up_tangent is None else silu
        assert_close(out, expected_tangent, rtol=1e-13, atol=1e-14)
    (grad,) = torch.autograd.grad(_SiluGate.apply(gate, up).sum(), gate)
    assert_close(grad, torch.sigmoid(gate) * (1 + gate * (1 - torch.sigmoid(gate))) * up)


def test_fused_blocks_patch_only_llamas_code_and_restore_everything():
    llama = LlamaConfig(hidden_size=8, intermediate_size=12, num_attention_heads=2, num_key_value_heads=1)
    qwen = Qwen2Config(hidden_size=8, intermediate_size=12, num_attention_heads=2, num_key_value_heads=1)
    gelu = LlamaConfig(hidden_size=8, intermediate_size=12, num_attention_heads=2, hidden_act="gelu")
    trainable_norm = LlamaRMSNorm(8)  # a trainable weight: the rule gives the weight no gradient
    fused = [LlamaRMSNorm(8).requires_grad_(False), Qwen2RMSNorm(8).requires_grad_(False), LlamaMLP(llama),
             Qwen2MLP(qwen)]  # fmt: skip

    class PatchedNorm(LlamaRMSNorm):  # e.g. a kernel library's forward: not the code the rule replaces
        def forward(self, hidden_states):
            return hidden_states

    kept = [trainable_norm, T5LayerNorm(8).requires_grad_(False), LlamaMLP(gelu), PatchedNorm(8).requires_grad_(False)]
    model = torch.nn.ModuleList(fused + kept)
    with fused_blocks(model):
        assert [m for m in model if "forward" in vars(m)] == fused
    assert not [m for m in model.modules() if "forward" in vars(m)]
    with torch.autocast("cpu", dtype=torch.bfloat16), fused_blocks(model):  # the rules would bypass its casts
        assert not [m for m in model.modules() if "forward" in vars(m)]
    with pytest.raises(RuntimeError, match="inside"), fused_blocks(model):
        raise RuntimeError("inside")
    assert not [m for m in model.modules() if "forward" in vars(m)]  # restored on error too


def test_rotary_rule_equals_llamas_function_in_primal_tangent_and_gradient():
    torch.manual_seed(0)
    q = torch.randn(2, 4, 5, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 5, 8, dtype=torch.float64, requires_grad=True)
    angles = torch.randn(2, 5, 8, dtype=torch.float64)
    cos, sin = angles.cos(), angles.sin()
    tangents = (torch.randn_like(q), torch.randn_like(k))
    cotangents = (torch.randn_like(q), torch.randn_like(k))

    def run(rotary):
        with fwAD.dual_level():
            outs = rotary(*(fwAD.make_dual(t, d) for t, d in zip((q, k), tangents, strict=True)), cos, sin)
            outs = [fwAD.unpack_dual(o) for o in outs]
        primals = [o.primal for o in outs]
        grads = torch.autograd.grad(primals, (q, k), cotangents)
        return [p.detach() for p in primals], [o.tangent.detach() for o in outs], grads

    expected, got = run(modeling_llama.apply_rotary_pos_emb), run(fused_rotary)
    for a, b in zip(got[0], expected[0], strict=True):
        assert torch.equal(a, b)  # Llama's ops: bit-identical
    for a, b in zip(got[1] + list(got[2]), expected[1] + list(expected[2]), strict=True):
        assert_close(a, b, rtol=1e-14, atol=1e-15)
    # by hand, one pair of dimensions: x = (1, 2), cos = (c, c), sin = (s, s): R(x) = (c − 2s, 2c + s); Rᵀ(1, 0) = (c, −s)
    c, s_ = 0.6, 0.8
    x = torch.tensor([[1.0, 2.0]], requires_grad=True)
    cs, ss = torch.full((1, 2), c), torch.full((1, 2), s_)
    out, _ = fused_rotary(x, x.detach(), cs, ss, unsqueeze_dim=0)
    assert_close(out.detach().flatten(), torch.tensor([c - 2 * s_, 2 * c + s_]))
    (grad,) = torch.autograd.grad(out, x, torch.tensor([[[1.0, 0.0]]]))
    assert_close(grad, torch.tensor([[c, -s_]]))
    assert torch.equal(rotate_half(torch.tensor([1.0, 2.0, 3.0, 4.0])), torch.tensor([-3.0, -4.0, 1.0, 2.0]))


def test_rotary_rule_leaves_a_trainable_cos_to_pytorch_and_the_patch_is_undone():
    cos = torch.randn(1, 3, 4, requires_grad=True)
    q = torch.randn(1, 2, 3, 4)
    out, _ = fused_rotary(q, q, cos, cos.detach())
    assert "Rotary" not in type(out.grad_fn).__name__  # PyTorch's own ops: cos gets its gradient
    assert torch.autograd.grad(out.sum(), cos)[0].abs().sum() > 0
    config = LlamaConfig(hidden_size=8, intermediate_size=12, num_attention_heads=2, num_key_value_heads=1)
    layer = modeling_llama.LlamaDecoderLayer(config, layer_idx=0)
    before = dict(vars(modeling_llama.apply_rotary_pos_emb)), modeling_llama.apply_rotary_pos_emb
    with fused_blocks(layer):
        assert modeling_llama.apply_rotary_pos_emb.forward is fused_rotary  # the kernels function module's forward
    assert (dict(vars(modeling_llama.apply_rotary_pos_emb)), modeling_llama.apply_rotary_pos_emb) == before
