"""Exact LoRA task arithmetic: merged weights equal θ0 + Σ α_t s_t B_t A_t, computed explicitly here."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import make_llama
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from delta_trl.adapter_io import load_adapter
from delta_trl.merging import _check_merge_inputs, fold_into_model, merge_adapters


TARGETS = ["q_proj", "v_proj"]


def save_adapter(path, config, seed: int, model_seed: int = 0, model=None):
    """Save a LoRA adapter with random (non-zero) A and B on the tiny Llama."""
    base = model if model is not None else make_llama(seed=model_seed)
    torch.manual_seed(seed)
    peft_model = get_peft_model(base, config)
    peft_model.save_pretrained(path)
    return path


@pytest.fixture
def two_adapters(tmp_path):
    """A plain LoRA (r=4, alpha=8) and an rsLoRA with per-module ranks and alphas."""
    plain = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    rs = LoraConfig(
        r=2,
        lora_alpha=6,
        use_rslora=True,
        target_modules=TARGETS,
        rank_pattern={"model.layers.0.self_attn.q_proj": 3},
        alpha_pattern={"v_proj": 5},
        init_lora_weights=False,
    )
    return save_adapter(tmp_path / "a", plain, seed=1), save_adapter(tmp_path / "b", rs, seed=2)


def explicit_deltas(folder, config_kwargs):
    """``s·B·A`` per module from the raw safetensors, with the scaling worked out by hand from the config."""
    weights = load_file(folder / "adapter_model.safetensors")
    out = {}
    for key, a in weights.items():
        if not key.endswith("lora_A.weight"):
            continue
        name = key.removesuffix(".lora_A.weight")
        b = weights[f"{name}.lora_B.weight"]
        r = a.shape[0]
        alpha = config_kwargs["alpha"](name)
        s = alpha / math.sqrt(r) if config_kwargs["rslora"] else alpha / r
        out[name.removeprefix("base_model.model.") + ".weight"] = s * b.double() @ a.double()
    return out


PLAIN = {"alpha": lambda name: 8, "rslora": False}
RS = {"alpha": lambda name: 5 if name.endswith("v_proj") else 6, "rslora": True}


def test_loaded_task_vector_matches_peft(two_adapters):
    _, rs = two_adapters
    adapter = load_adapter(rs)
    peft_model = PeftModel.from_pretrained(make_llama(), rs)
    ranks = {name: m.rank for name, m in adapter.modules.items()}
    assert ranks["base_model.model.model.layers.0.self_attn.q_proj"] == 3
    assert ranks["base_model.model.model.layers.1.self_attn.q_proj"] == 2
    for name, module in peft_model.named_modules():
        if hasattr(module, "get_delta_weight") and "default" in getattr(module, "scaling", {}):
            torch.testing.assert_close(adapter.modules[name].delta(), module.get_delta_weight("default"))


def test_merged_adapter_is_exact_and_matches_folded_model(two_adapters, tmp_path):
    a, b = two_adapters
    coefficients = [0.7, -1.3]
    adapter_out = merge_adapters([a, b], coefficients, tmp_path / "merged")
    model_out = merge_adapters([a, b], coefficients, tmp_path / "folded", fold_into_base=True, base_model=make_llama())

    expected = {k: 0.7 * v for k, v in explicit_deltas(a, PLAIN).items()}
    for k, v in explicit_deltas(b, RS).items():
        expected[k] = expected[k] - 1.3 * v

    config = json.loads((adapter_out.output_dir / "adapter_config.json").read_text())
    assert config["use_rslora"] is False
    assert config["r"] == config["lora_alpha"] == 6  # 4 + 2 on three of four modules
    assert config["rank_pattern"] == config["alpha_pattern"] == {"model.layers.0.self_attn.q_proj": 7}
    assert adapter_out.report["ranks"]["base_model.model.model.layers.0.self_attn.q_proj"] == 7

    base = make_llama()
    theta0 = {k: v.clone() for k, v in base.state_dict().items()}
    merged = PeftModel.from_pretrained(base, adapter_out.output_dir)
    for name, module in merged.named_modules():
        if hasattr(module, "get_delta_weight") and "default" in getattr(module, "scaling", {}):
            assert module.scaling["default"] == 1.0
            torch.testing.assert_close(
                module.get_delta_weight("default").double(),
                expected[f"{name.removeprefix('base_model.model.')}.weight"],
            )

    folded = LlamaForCausalLM.from_pretrained(model_out.output_dir)
    for key, value in folded.state_dict().items():
        want = theta0[key].double() + expected[key] if key in expected else theta0[key].double()
        torch.testing.assert_close(value.double(), want, rtol=1e-5, atol=1e-6)

    ids = torch.randint(2, 300, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, folded(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


def test_fold_leaves_caller_model_unchanged(two_adapters, tmp_path):
    base = make_llama()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    merge_adapters(list(two_adapters), [1.0, 1.0], tmp_path / "folded", fold_into_base=True, base_model=base)
    for key, value in base.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)


def test_fan_in_fan_out_fold(tmp_path):
    """GPT-2 stores Conv1D weights as (in, out): the fold must add ΔWᵀ."""
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=16))
    config = LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False)
    peft_model = get_peft_model(base, config)
    peft_model.save_pretrained(tmp_path / "a")
    layer = peft_model.base_model.model.transformer.h[0].attn.c_attn
    expected = layer.get_delta_weight("default")  # PEFT transposes for fan_in_fan_out
    w0 = layer.base_layer.weight.detach().clone()

    fresh = GPT2LMHeadModel(base.config)
    fresh.transformer.h[0].attn.c_attn.weight.data.copy_(w0)
    adapter = load_adapter(tmp_path / "a")
    fold_into_model(fresh, {k: -2.0 * v for k, v in adapter.task_vector().items()}, fan_in_fan_out=True)
    torch.testing.assert_close(fresh.transformer.h[0].attn.c_attn.weight, w0 - 2.0 * expected)


def no_partial_output(tmp_path, name):
    return not (tmp_path / name).exists() and not list(tmp_path.glob(f".{name}.tmp-*"))


def _edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("case", "error", "match"),
    [
        ("missing", FileNotFoundError, "does not exist"),
        ("other_base", ValueError, "different base models"),
        ("targets", ValueError, "different modules"),
        ("dora", ValueError, "variant"),
        ("ia3", ValueError, "only LoRA"),
        ("nan", ValueError, "finite"),
        ("count", ValueError, "one per adapter"),
        ("density", ValueError, "density"),
        ("method", ValueError, "Unknown merge method"),
        ("base_shapes", ValueError, "Shape mismatch"),
        ("modules_to_save", ValueError, "more than LoRA"),
        ("embedding", ValueError, "other than linear LoRA"),
        ("no_weights", FileNotFoundError, "no adapter_model"),
    ],
)
def test_bad_inputs_raise_and_write_nothing(two_adapters, tmp_path, case, error, match):
    a, b = two_adapters
    adapters, coefficients, kwargs = [a, b], [1.0, 1.0], {}
    if case == "missing":
        adapters = [a, tmp_path / "nope"]
    elif case == "other_base":
        _edit_config(b, base_model_name_or_path="someone/other-model")
    elif case == "targets":
        adapters = [
            a,
            save_adapter(tmp_path / "c", LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), 3),
        ]
    elif case == "dora":
        config = LoraConfig(r=2, target_modules=TARGETS, use_dora=True, init_lora_weights=False)
        adapters = [a, save_adapter(tmp_path / "c", config, 3)]
    elif case == "ia3":
        peft_model = get_peft_model(make_llama(), IA3Config(target_modules=["q_proj"], feedforward_modules=[]))
        peft_model.save_pretrained(tmp_path / "c")
        adapters = [a, tmp_path / "c"]
    elif case == "nan":
        coefficients = [1.0, float("nan")]
    elif case == "count":
        coefficients = [1.0]
    elif case == "density":
        kwargs = {"method": "ties", "density": 0.0}
    elif case == "method":
        kwargs = {"method": "linear"}
    elif case == "base_shapes":
        other = LlamaConfig(
            vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4
        )
        kwargs = {"base_model": LlamaForCausalLM(other), "fold_into_base": True}
    elif case == "modules_to_save":
        config = LoraConfig(r=2, target_modules=TARGETS, modules_to_save=["lm_head"], init_lora_weights=False)
        adapters = [a, save_adapter(tmp_path / "c", config, 3)]
    elif case == "embedding":
        config = LoraConfig(r=2, target_modules=[*TARGETS, "embed_tokens"], init_lora_weights=False)
        adapters = [save_adapter(tmp_path / "c", config, 3), save_adapter(tmp_path / "d", config, 4)]
    elif case == "no_weights":
        (b / "adapter_model.safetensors").unlink()
    with pytest.raises(error, match=match):
        merge_adapters(adapters, coefficients, tmp_path / "out", **kwargs)
    assert no_partial_output(tmp_path, "out")


def test_existing_output_needs_overwrite(two_adapters, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(ValueError, match="already exists"):
        merge_adapters(list(two_adapters), None, out)
    assert (out / "keep.txt").read_text() == "old"
    merge_adapters(list(two_adapters), None, out, overwrite=True)
    assert not (out / "keep.txt").exists()
    assert (out / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize("fold", [False, True])
def test_non_finite_result_writes_nothing(two_adapters, tmp_path, fold):
    a, b = two_adapters
    weights = load_file(a / "adapter_model.safetensors")
    key = next(k for k in weights if k.endswith("lora_B.weight"))
    weights[key][0, 0] = float("inf")
    save_file(weights, a / "adapter_model.safetensors")
    kwargs = {"fold_into_base": True, "base_model": make_llama()} if fold else {}
    with pytest.raises(ValueError, match="non-finite"):
        merge_adapters([a, b], [1.0, 1.0], tmp_path / "out", **kwargs)
    assert no_partial_output(tmp_path, "out")


def test_check_returns_plan_without_writing(two_adapters, tmp_path):
    plan = _check_merge_inputs(list(two_adapters), [0.5, 2.0], tmp_path / "out")
    assert plan.coefficients == [0.5, 2.0]
    assert len(plan.modules) == 4
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", ["ties", "dare"])
def test_baselines_write_refactored_adapter_with_error(two_adapters, tmp_path, method):
    result = merge_adapters(list(two_adapters), [1.0, 1.0], tmp_path / method, method=method, density=0.5)
    errors = result.report["svd_relative_error"]
    assert 0.0 < errors["max"] < 1.0
    assert set(errors["per_module"]) == set(result.report["ranks"])
    merged = PeftModel.from_pretrained(make_llama(), result.output_dir)
    ids = torch.randint(2, 300, (1, 5))
    assert torch.isfinite(merged(input_ids=ids).logits).all()


def test_task_vector_algebra(two_adapters, tmp_path):
    from delta_trl.task_vector import TaskVector

    a, b = two_adapters
    ta, tb = TaskVector.from_adapter(a), TaskVector.from_adapter(b)
    combo = 0.7 * ta - 1.3 * tb
    expected = {k: 0.7 * v for k, v in explicit_deltas(a, PLAIN).items()}
    for k, v in explicit_deltas(b, RS).items():
        expected[k] = expected[k] - 1.3 * v
    for name, delta in combo.deltas.items():
        torch.testing.assert_close(delta.double(), expected[name.removeprefix("base_model.model.") + ".weight"])
    assert ta.dot(ta) == pytest.approx(ta.norm() ** 2)
    assert ta.cosine(ta) == pytest.approx(1.0)

    folded = merge_adapters([a, b], [0.7, -1.3], tmp_path / "folded", fold_into_base=True, base_model=make_llama())
    model = combo.apply_to(make_llama())
    reference = LlamaForCausalLM.from_pretrained(folded.output_dir)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value)

    partial = TaskVector(dict(list(ta.deltas.items())[:1]))
    with pytest.raises(ValueError, match="different modules"):
        ta + partial
    with pytest.raises(TypeError):
        ta * ta


def test_unreachable_hub_id_is_file_not_found(two_adapters, tmp_path):
    """conftest sets HF_HUB_OFFLINE=1: an `owner/name` that is no local folder cannot be fetched."""
    with pytest.raises(FileNotFoundError, match="neither a local adapter folder nor a downloadable hub repo"):
        merge_adapters([two_adapters[0], "nobody/no-such-adapter"], None, tmp_path / "out")
    assert no_partial_output(tmp_path, "out")


def test_t5_merged_adapter_matches_folded_model(tmp_path):
    """Encoder-decoder: the concatenated adapter and the folded model agree (rsLoRA + plain, negative α)."""
    from conftest import make_t5
    from transformers import T5ForConditionalGeneration

    paths = []
    for i, rs in enumerate([False, True]):
        torch.manual_seed(40 + i)
        config = LoraConfig(r=2 + i, lora_alpha=4, use_rslora=rs, target_modules=["q", "v"], init_lora_weights=False)
        get_peft_model(make_t5(), config).save_pretrained(tmp_path / f"t{i}")
        paths.append(tmp_path / f"t{i}")
    adapter = merge_adapters(paths, [1.5, -0.5], tmp_path / "adapter")
    folded = merge_adapters(paths, [1.5, -0.5], tmp_path / "model", fold_into_base=True, base_model=make_t5())
    merged = PeftModel.from_pretrained(make_t5(), adapter.output_dir).eval()
    reference = T5ForConditionalGeneration.from_pretrained(folded.output_dir).eval()
    ids, labels = torch.randint(2, 300, (2, 6)), torch.randint(2, 300, (2, 4))
    with torch.no_grad():
        torch.testing.assert_close(
            merged(input_ids=ids, labels=labels).logits, reference(input_ids=ids, labels=labels).logits
        )
