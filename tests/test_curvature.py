"""Curvature maths, penalty and estimation: hand-checkable identities and brute-force references on tiny models."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import make_llama, make_t5, make_tokenizer
from peft import LoraConfig, get_peft_model
from torch.testing import assert_close
from transformers import PretrainedConfig

import delta_trl.curvature.estimation as estimation
from delta_trl.core.adapters import add_teacher_adapter, scaled_adapters, unparked
from delta_trl.curvature.estimation import estimate_curvature, example_probe
from delta_trl.curvature.factors import (
    CurvatureFactors,
    LayerCurvature,
    curvature_penalty,
    ekfac_penalty,
    kfac_penalty,
    resolve_target_modules,
)


TEXTS = [
    "What is 2 + 3? 5. What is 7 + 1? 8.",
    "the cat sleeps",
    "premise: a man plays a guitar. hypothesis: a person makes music.",
    "yes",
    "The capital of France is Paris.",
]


def spd(n: int, generator: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, 2 * n, generator=generator, dtype=torch.float64)
    return x @ x.T / (2 * n)


def col_vec(x: torch.Tensor) -> torch.Tensor:
    """Column-stacking vec(X), the convention of vec(G X A) = (Aᵀ ⊗ G) vec(X)."""
    return x.T.reshape(-1)


@pytest.fixture
def lora_tensors():
    gen = torch.Generator().manual_seed(0)
    d_out, d_in, r = 5, 7, 3
    lora_a = torch.randn(r, d_in, generator=gen, dtype=torch.float64, requires_grad=True)
    lora_b = torch.randn(d_out, r, generator=gen, dtype=torch.float64, requires_grad=True)
    return lora_a, lora_b, 0.75, spd(d_in, gen), spd(d_out, gen)


def test_kfac_low_rank_form_equals_dense_kronecker_form(lora_tensors):
    """s²·tr((BᵀGB)(A_l A A_lᵀ)) = vec(ΔW)ᵀ (A ⊗ G) vec(ΔW) (column vec) = vec_row(ΔW)ᵀ (G ⊗ A) vec_row(ΔW)."""
    lora_a, lora_b, s, a_cov, g_cov = lora_tensors
    delta = s * lora_b @ lora_a
    dense_col = col_vec(delta) @ torch.kron(a_cov, g_cov) @ col_vec(delta)
    dense_row = delta.reshape(-1) @ torch.kron(g_cov, a_cov) @ delta.reshape(-1)
    low_rank = kfac_penalty(lora_a, lora_b, s, a_cov, g_cov)
    assert_close(low_rank, dense_col)
    assert_close(low_rank, dense_row)
    assert_close(low_rank, torch.trace(g_cov @ delta @ a_cov @ delta.T))
    grads = torch.autograd.grad(low_rank, (lora_a, lora_b))
    assert_close(grads, torch.autograd.grad(dense_col, (lora_a, lora_b)))


def test_ekfac_penalty_equals_its_dense_form_and_kfac_with_kronecker_eigenvalues(lora_tensors):
    """R = vec(ΔW)ᵀ (U_A ⊗ U_G) diag(vec D) (U_A ⊗ U_G)ᵀ vec(ΔW); with D_ij = λ_G,i λ_A,j it is exactly K-FAC."""
    lora_a, lora_b, s, a_cov, g_cov = lora_tensors
    lambda_a, u_a = torch.linalg.eigh(a_cov)
    lambda_g, u_g = torch.linalg.eigh(g_cov)
    d = torch.rand(g_cov.shape[0], a_cov.shape[0], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    delta = s * lora_b @ lora_a
    rotation = torch.kron(u_a, u_g)
    dense = col_vec(delta) @ rotation @ torch.diag(col_vec(d)) @ rotation.T @ col_vec(delta)
    value = ekfac_penalty(lora_a, lora_b, s, u_a, u_g, d)
    assert_close(value, dense)
    assert_close(torch.autograd.grad(value, (lora_a, lora_b)), torch.autograd.grad(dense, (lora_a, lora_b)))
    kronecker_d = torch.outer(lambda_g, lambda_a)
    assert_close(
        ekfac_penalty(lora_a, lora_b, s, u_a, u_g, kronecker_d), kfac_penalty(lora_a, lora_b, s, a_cov, g_cov)
    )


def test_penalty_hand_worked_value():
    """d_out = d_in = 2, r = 1: B = [1, 2]ᵀ, A_l = [1, 1], s = 2 → ΔW = [[2, 2], [4, 4]].
    A = diag(1, 3), G = diag(2, 1): tr(G ΔW A ΔWᵀ) = 2·(4 + 12) + 1·(16 + 48) = 96.
    EK-FAC with U = I and D = [[1, 0], [0, 2]]: 1·2² + 2·4² = 36."""
    lora_a, lora_b = torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0], [2.0]])
    assert (
        kfac_penalty(lora_a, lora_b, 2.0, torch.diag(torch.tensor([1.0, 3.0])), torch.diag(torch.tensor([2.0, 1.0])))
        == 96
    )
    d = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert ekfac_penalty(lora_a, lora_b, 2.0, torch.eye(2), torch.eye(2), d) == 36


class OneLinear(torch.nn.Module):
    """Embedding then one linear layer whose output is the final hidden state: h_t = W a_t."""

    def __init__(self, vocab: int, d_in: int, d_out: int) -> None:
        super().__init__()
        self.config = PretrainedConfig()
        self.embed = torch.nn.Embedding(vocab, d_in)
        self.proj = torch.nn.Linear(d_in, d_out, bias=False)

    def forward(self, input_ids, attention_mask=None, output_hidden_states=False, return_dict=True):
        a = self.embed(input_ids)
        return SimpleNamespace(hidden_states=(a, self.proj(a)))


def test_ekfac_with_exact_statistics_equals_brute_force_ggn(monkeypatch):
    """For h_t = W a_t the GGN is E_n[Σ_t a_t a_tᵀ] ⊗ I and EK-FAC (and K-FAC) are exact when their statistics are. Each text is
    repeated K times with probes √(L·H)·e_k cycling over all L·H basis directions, so the per-text average of every
    second moment equals its expectation under v ~ N(0, I) exactly. The brute force is jacrev of h over W."""
    tokenizer, hidden, max_length = make_tokenizer(300), 4, 3
    torch.manual_seed(0)
    model = get_peft_model(
        OneLinear(300, 6, hidden), LoraConfig(r=2, lora_alpha=3, target_modules=["proj"], init_lora_weights=False)
    )
    base_texts = ["the cat sleeps", "yes", "What is 2 + 3?"]
    ids = [tokenizer(t, truncation=True, max_length=max_length).input_ids for t in base_texts]
    lengths = [len(i) for i in ids]
    assert len(set(lengths)) > 1  # padding happens in mixed batches
    copies = math.lcm(*(n * hidden for n in lengths))
    texts, plan = [], {}
    for text, n in zip(base_texts, lengths, strict=True):
        for k in range(copies):
            plan[len(texts)] = (n, k % (n * hidden))
            texts.append(text)

    def basis_probe(index, length, width, seed):
        n, k = plan[index]
        assert (length, width) == (n, hidden)
        v = torch.zeros(n * width)
        v[k] = math.sqrt(n * width)
        return v.view(n, width)

    monkeypatch.setattr(estimation, "example_probe", basis_probe)
    factors = estimate_curvature(model, tokenizer, texts, max_length=max_length, batch_size=5, progress=False)

    weight = model.get_base_model().proj.base_layer.weight.detach()
    ggn = torch.zeros(weight.numel(), weight.numel())
    for token_ids in ids:
        a = model.get_base_model().embed(torch.tensor(token_ids)).detach()
        jac = torch.func.jacrev(lambda w, a=a: a @ w.T)(weight).reshape(-1, weight.numel())  # (L·H, d_out·d_in)
        ggn += jac.T @ jac / len(ids)
    layer = model.get_base_model().proj
    tau = (layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight).reshape(-1)
    dense = tau @ ggn @ tau
    penalty = curvature_penalty(model, factors, "default")
    assert_close(penalty, dense, rtol=1e-4, atol=1e-6)
    params = (layer.lora_A["default"].weight, layer.lora_B["default"].weight)
    assert_close(torch.autograd.grad(penalty, params), torch.autograd.grad(dense, params), rtol=1e-4, atol=1e-6)
    # K-FAC is exact here too: G = L̄·I and A = (1/M) Σ a aᵀ, so A ⊗ G = (1/N) Σ_n Σ_t a_t a_tᵀ ⊗ I
    kfac = estimate_curvature(model, tokenizer, texts, max_length=max_length, estimator="kfac", progress=False)
    assert_close(curvature_penalty(model, kfac, "default"), dense, rtol=1e-4, atol=1e-6)


def brute_force_statistics(model, tokenizer, texts, names, max_length, seed=0):
    """A, G and per-example weight gradients of ⟨h_n, v_n⟩, one unpadded example at a time, via autograd."""
    modules = dict(model.named_modules())
    inputs, outputs = {}, {}

    def keep(module, args, out, name):  # returns None: the hook must not replace the output
        inputs[name], outputs[name] = args[0], out

    hooks = [modules[n].register_forward_hook(lambda m, args, out, n=n: keep(m, args, out, n)) for n in names]
    a_sum = dict.fromkeys(names, 0)
    g_sum = dict.fromkeys(names, 0)
    pseudo = {n: [] for n in names}
    tokens = 0
    for index, text in enumerate(texts):
        ids = torch.tensor([tokenizer(text, truncation=True, max_length=max_length).input_ids])
        h = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]
        objective = (h * example_probe(index, ids.shape[1], h.shape[-1], seed)).sum()
        weights = [modules[n].weight for n in names]
        grads = torch.autograd.grad(objective, [outputs[n] for n in names] + weights)
        for i, n in enumerate(names):
            a, g = inputs[n][0].detach(), grads[i][0]
            a_sum[n] = a_sum[n] + a.T @ a
            g_sum[n] = g_sum[n] + g.T @ g
            pseudo[n].append(grads[len(names) + i])
        tokens += ids.shape[1]
    for hook in hooks:
        hook.remove()
    return {n: (a_sum[n] / tokens, g_sum[n] / len(texts), pseudo[n]) for n in names}


def test_estimator_matches_per_example_autograd_and_ignores_padding():
    """Batched, right-padded estimation (batch 3) equals one-example-at-a-time autograd: A = mean over real tokens of
    a aᵀ, G = per-example sum of g gᵀ averaged over examples, D = mean_n (U_Gᵀ ∇W_n U_A)² with ∇W_n the weight
    gradient of ⟨h_n, v_n⟩."""
    tokenizer, model = make_tokenizer(300), make_llama()
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    factors = estimate_curvature(
        model, tokenizer, TEXTS, target_modules=names, max_length=12, batch_size=3, progress=False
    )
    reference = brute_force_statistics(model, tokenizer, TEXTS, names, max_length=12)
    for name in names:
        a_cov, g_cov, pseudo = reference[name]
        layer = factors.layers[name]
        assert_close(layer.A, a_cov, rtol=1e-4, atol=1e-7)
        assert_close(layer.G, g_cov, rtol=1e-4, atol=1e-9)
        u_a, u_g = layer.tensors["U_A"], layer.tensors["U_G"]
        d = torch.stack([(u_g.T @ w @ u_a).square() for w in pseudo]).mean(0)
        assert_close(layer.tensors["D"], d, rtol=1e-3, atol=1e-10)


@pytest.mark.parametrize("make_model", [make_llama, make_t5], ids=["llama", "t5"])
def test_factors_symmetric_psd_and_padding_free(make_model):
    tokenizer, model = make_tokenizer(300), make_model()
    targets = ["q_proj", "v_proj"] if make_model is make_llama else ["q", "v"]
    kwargs = {"target_modules": targets, "max_length": 16, "progress": False}
    batched = estimate_curvature(model, tokenizer, TEXTS, batch_size=5, **kwargs)
    single = estimate_curvature(model, tokenizer, TEXTS, batch_size=1, **kwargs)
    kfac = estimate_curvature(model, tokenizer, TEXTS, batch_size=2, estimator="kfac", **kwargs)
    assert batched.module_names == single.module_names == kfac.module_names
    assert len(batched.layers) == (4 if make_model is make_llama else 12)
    for name, layer in batched.layers.items():
        for key, tensor in layer.tensors.items():  # padding (batch 5) changes nothing (batch 1: no padding)
            if key.startswith("U_"):  # eigenvectors are defined up to sign: compare the rebuilt matrices instead
                continue
            # D is expressed in float32 eigenbases, which rotate slightly within near-degenerate eigenspaces
            tolerance = (
                {"rtol": 2e-3, "atol": 1e-3 * tensor.max().item()} if key == "D" else {"rtol": 1e-4, "atol": 1e-8}
            )
            assert_close(tensor, single.layers[name].tensors[key], **tolerance)
        assert_close(layer.A, single.layers[name].A, rtol=1e-4, atol=1e-6 * layer.A.abs().max().item())
        for matrix, eigenvalues, basis in ((layer.A, layer.tensors["lambda_A"], layer.tensors["U_A"]),
                                           (layer.G, layer.tensors["lambda_G"], layer.tensors["U_G"])):  # fmt: skip
            assert_close(matrix, matrix.T)
            assert eigenvalues.min() >= -1e-6 * eigenvalues.max()
            assert_close(basis.T @ basis, torch.eye(basis.shape[0]), atol=1e-5, rtol=0)
        assert (layer.tensors["D"] >= 0).all()
        # same first pass, any batch size; fp32 sums in another order differ by a few ulps of the largest entry
        for key in ("A", "G"):
            reference = getattr(layer, key)
            scale = reference.abs().max().item()
            assert_close(getattr(kfac.layers[name], key), reference, rtol=1e-4, atol=1e-5 * scale)
        eigenvalues_g = torch.linalg.eigvalsh(kfac.layers[name].G.double())
        assert eigenvalues_g.min() >= -1e-6 * eigenvalues_g.max()


def test_curvature_penalty_uses_the_nominal_scaling_whatever_the_live_scale():
    """Σ_layers of the low-level penalty with s = lora_alpha/r, whether the adapter is parked, unparked or scaled by
    α inside a training step."""
    torch.manual_seed(0)
    model = get_peft_model(
        make_llama(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    add_teacher_adapter(model, "default", "teacher", None)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B.teacher" in name:
                p.normal_()
    factors = estimate_curvature(model, make_tokenizer(300), TEXTS, max_length=8, progress=False)
    assert len(factors.layers) == 4
    expected = 0
    for name, module in model.get_base_model().named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            u = factors.layers[name].tensors
            expected += ekfac_penalty(
                module.lora_A["default"].weight, module.lora_B["default"].weight, 2.0, u["U_A"], u["U_G"], u["D"]
            )
    assert_close(curvature_penalty(model, factors, "default"), expected)
    with scaled_adapters(model, {"default": 1.7}):  # the student inside a step at α = 1.7
        assert_close(curvature_penalty(model, factors, "default"), expected, rtol=0, atol=0)
    teacher = curvature_penalty(model, factors, "teacher")  # parked: live scale 0, nominal penalty all the same
    with unparked(model, "teacher"):
        assert_close(curvature_penalty(model, factors, "teacher"), teacher, rtol=0, atol=0)
    assert teacher.item() > 0
    teacher.backward()
    grads = [p.grad for n, p in model.named_parameters() if ".teacher." in n]
    assert all(g is not None for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for n, p in model.named_parameters() if ".default." in n)
    missing = factors.select([n for n in factors.module_names if "q_proj" in n])
    with pytest.raises(ValueError, match="do not cover the LoRA layers"):
        curvature_penalty(model, missing, "default")


def test_kfac_factors_in_the_penalty_match_lowlevel():
    model = get_peft_model(make_llama(), LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights=False))
    factors = estimate_curvature(model, make_tokenizer(300), TEXTS, max_length=8, estimator="kfac", progress=False)
    expected = sum(
        kfac_penalty(
            m.lora_A["default"].weight,
            m.lora_B["default"].weight,
            m.scaling["default"],
            factors.layers[n].A,
            factors.layers[n].G,
        )
        for n, m in model.get_base_model().named_modules()
        if n in factors.layers
    )
    assert_close(curvature_penalty(model, factors, "default"), expected)


def test_resolve_target_modules():
    model = make_llama()
    assert resolve_target_modules(model, ["q_proj"]) == [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]
    assert resolve_target_modules(model, LoraConfig(target_modules=["v_proj"]))[0].endswith("v_proj")
    assert resolve_target_modules(model, r".*\.0\.self_attn\.(q|k)_proj") == [
        "model.layers.0.self_attn.k_proj",
        "model.layers.0.self_attn.q_proj",
    ]
    all_linear = resolve_target_modules(model, "all-linear")
    assert len(all_linear) == 14
    assert "lm_head" not in all_linear
    with pytest.raises(ValueError, match=r"\['qq_proj'\] match no module"):
        resolve_target_modules(model, ["q_proj", "qq_proj"])
    with pytest.raises(ValueError, match="linear layers only"):
        resolve_target_modules(model, ["embed_tokens"])
    with pytest.raises(ValueError, match="no LoRA layer"):
        resolve_target_modules(model, None)
    peft_model = get_peft_model(make_llama(), LoraConfig(r=2, target_modules=["k_proj"]))
    assert resolve_target_modules(peft_model) == [f"model.layers.{i}.self_attn.k_proj" for i in range(2)]


def test_layer_curvature_validation():
    with pytest.raises(ValueError, match="Unknown curvature estimator"):
        LayerCurvature("diag", {})
    with pytest.raises(ValueError, match="needs the tensors"):
        LayerCurvature("kfac", {"A": torch.eye(2)})
    with pytest.raises(ValueError, match="at least one layer"):
        CurvatureFactors(layers={})


def test_fan_in_fan_out_layers_are_refused():
    """GPT-2's Conv1D weights are stored transposed (PEFT's fan_in_fan_out): refused, not silently mis-oriented."""
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_positions=32, n_embd=16, n_layer=1, n_head=2))
    config = LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    with pytest.raises(ValueError, match="linear layers only"):
        resolve_target_modules(peft_model)
    layer = LayerCurvature("kfac", {"A": torch.eye(16), "G": torch.eye(48)})
    factors = CurvatureFactors({"transformer.h.0.attn.c_attn": layer})
    with pytest.raises(ValueError, match="fan_in_fan_out"):
        curvature_penalty(peft_model, factors, "default")


def test_dora_adapter_is_refused():
    model = get_peft_model(make_llama(), LoraConfig(r=2, target_modules=["v_proj"], use_dora=True))
    layer = LayerCurvature("kfac", {"A": torch.eye(32), "G": torch.eye(16)})
    factors = CurvatureFactors({f"model.layers.{i}.self_attn.v_proj": layer for i in range(2)})
    with pytest.raises(ValueError, match="DoRA"):
        curvature_penalty(model, factors, "default")
