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

from delta_trl.core.fingerprint import base_model_fingerprint
from delta_trl.merging.adapter_io import load_adapter
from delta_trl.merging.merge import _check_merge_inputs, fold_into_model, merge_adapters
from delta_trl.merging.methods import MergeMethod, combine_with_method


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


def mark(folder, **metadata):
    """Write the trainer's delta_trl.json beside adapter_config.json."""
    (folder / "delta_trl.json").write_text(json.dumps(metadata))
    return folder


LINEAR = {"delta_mode": "linear", "evaluate_linearized": True}


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
        ("mixed_modes", ValueError, "Cannot merge adapters evaluated linearized"),
        ("fold_linear", ValueError, "trained in `linear` mode"),
        ("other_base_hash", ValueError, "different base models.*base_model_sha256"),
        ("fold_other_base", ValueError, "not the one the adapters were trained on"),
        ("shape_check_other_base", ValueError, "not the one the adapters were trained on"),
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
    elif case == "mixed_modes":
        mark(a, **LINEAR)
        mark(b, delta_mode="delta", evaluate_linearized=False)
    elif case == "fold_linear":
        mark(a, **LINEAR)
        mark(b, **LINEAR)
        kwargs = {"fold_into_base": True, "base_model": make_llama()}
    elif case == "other_base_hash":  # same name and shapes, other weights
        mark(a, base_model_sha256=base_model_fingerprint(make_llama()))
        mark(b, base_model_sha256=base_model_fingerprint(make_llama(seed=1)))
    elif case in ("fold_other_base", "shape_check_other_base"):
        for folder in (a, b):
            mark(folder, base_model_sha256=base_model_fingerprint(make_llama()))
        other = make_llama()
        with torch.no_grad():
            other.model.norm.weight[0] = 2.0  # not a LoRA target: only the content hash sees it
        kwargs = {"base_model": other, "fold_into_base": case == "fold_other_base"}
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
    plan = _check_merge_inputs(list(two_adapters), None, tmp_path / "out")
    assert plan.coefficients == [1.0, 1.0]
    assert plan.modules == [
        f"base_model.model.model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")
    ]
    assert (plan.evaluate_linearized, plan.base_model_sha256) == (False, None)
    assert not (tmp_path / "out").exists()


def test_linear_adapters_merge_into_a_linearized_adapter(two_adapters, tmp_path):
    """The merged adapter keeps `evaluate_linearized` and the base hash, so evaluation linearizes the sum."""
    from delta_trl.evaluation.scoring import load_task_adapters

    a, b = two_adapters
    fingerprint = base_model_fingerprint(make_llama())
    for folder in (a, b):
        mark(folder, **LINEAR, base_model_sha256=fingerprint)
    for method in ("task_arithmetic", "ties"):
        density = 1.0 if method == "task_arithmetic" else 0.5
        result = merge_adapters([a, b], [0.5, 0.5], tmp_path / method, method=method, density=density)
        metadata = json.loads((result.output_dir / "delta_trl.json").read_text())
        assert metadata["evaluate_linearized"] is True
        assert metadata["base_model_sha256"] == fingerprint
        assert metadata["delta_mode"] == "linear"
        assert metadata["merge_method"] == method
        assert result.report["base_model_sha256"] == fingerprint
        _, linearized = load_task_adapters(make_llama(), {"merged": result.output_dir})
        assert linearized is True
    # merged linear adapters merge again (their marker is read back), and still refuse to be folded
    again = merge_adapters([tmp_path / "task_arithmetic", a], [1.0, -0.5], tmp_path / "again")
    assert json.loads((again.output_dir / "delta_trl.json").read_text())["evaluate_linearized"] is True
    with pytest.raises(ValueError, match="trained in `linear` mode"):
        merge_adapters(
            [tmp_path / "task_arithmetic"], [1.0], tmp_path / "f", fold_into_base=True, base_model=make_llama()
        )


def test_ordinary_merge_records_no_linearization_and_only_a_common_hash(two_adapters, tmp_path):
    a, b = two_adapters
    mark(a, delta_mode="delta", evaluate_linearized=False, base_model_sha256=base_model_fingerprint(make_llama()))
    result = merge_adapters([a, b], None, tmp_path / "m")  # b records no hash: none is claimed for the sum
    assert json.loads((result.output_dir / "delta_trl.json").read_text()) == {
        "delta_trl_version": __import__("delta_trl").__version__,
        "merge_method": "task_arithmetic",
        "evaluate_linearized": False,
    }


def test_recorded_hash_not_name_identifies_the_base(two_adapters, tmp_path):
    """Equal content hashes merge even when the recorded names differ (a hub id and a local copy of it)."""
    a, b = two_adapters
    _edit_config(b, base_model_name_or_path="/local/copy/of/the/model")
    fingerprint = base_model_fingerprint(make_llama())
    for folder in (a, b):
        mark(folder, base_model_sha256=fingerprint)
    result = merge_adapters([a, b], [1.0, 1.0], tmp_path / "m", fold_into_base=True, base_model=make_llama())
    assert result.report["base_model_sha256"] == fingerprint
    folded = LlamaForCausalLM.from_pretrained(result.output_dir).state_dict()
    key = "model.layers.1.self_attn.v_proj.weight"
    expected = make_llama().state_dict()[key].double() + explicit_deltas(a, PLAIN)[key] + explicit_deltas(b, RS)[key]
    torch.testing.assert_close(folded[key].double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["ties", "dare"])
def test_baselines_write_refactored_adapter_with_error(two_adapters, tmp_path, method):
    """The written adapter is the best rank-(r1 + r2) approximation of the dense merge; the reported error is the
    Eckart–Young tail √(Σ_{i>r} σ_i²) / √(Σ σ_i²) of that dense merge, recomputed here from the inputs."""
    a, b = two_adapters
    result = merge_adapters([a, b], [1.0, 0.5], tmp_path / method, method=method, density=0.5, seed=3)
    errors = result.report["svd_relative_error"]
    adapters = [load_adapter(a), load_adapter(b)]
    generator = torch.Generator().manual_seed(3)  # the masks are drawn per module in sorted module order
    merged = PeftModel.from_pretrained(make_llama(), result.output_dir)
    layers = dict(merged.named_modules())
    for name in sorted(adapters[0].modules):
        dense = combine_with_method(
            [x.modules[name].delta() for x in adapters],
            [1.0, 0.5],
            MergeMethod(method),
            density=0.5,
            generator=generator,
        ).double()
        rank = result.report["ranks"][name]
        assert rank == adapters[0].modules[name].rank + adapters[1].modules[name].rank
        sigma = torch.linalg.svdvals(dense)
        tail = float(sigma[rank:].square().sum().sqrt() / sigma.square().sum().sqrt())
        assert errors["per_module"][name] == pytest.approx(tail, rel=1e-4, abs=1e-7)
        written = layers[name].get_delta_weight("default").double()
        assert float((dense - written).norm() / dense.norm()) == pytest.approx(tail, rel=1e-4, abs=1e-6)
    assert errors["max"] == max(errors["per_module"].values())
    assert errors["max"] > 0.01  # density 0.5 makes each 32 x 32 ΔW far from low rank


def test_task_vector_algebra(two_adapters, tmp_path):
    from delta_trl.merging.task_vector import TaskVector

    a, b = two_adapters
    ta, tb = TaskVector.from_adapter(a), TaskVector.from_adapter(b)
    combo = 0.7 * ta - 1.3 * tb
    expected = {k: 0.7 * v for k, v in explicit_deltas(a, PLAIN).items()}
    for k, v in explicit_deltas(b, RS).items():
        expected[k] = expected[k] - 1.3 * v
    for name, delta in combo.deltas.items():
        torch.testing.assert_close(delta.double(), expected[name.removeprefix("base_model.model.") + ".weight"])
    ea, eb = explicit_deltas(a, PLAIN), explicit_deltas(b, RS)
    dot = sum(float((ea[k] * eb[k]).sum()) for k in ea)
    norm_a = math.sqrt(sum(float(v.square().sum()) for v in ea.values()))
    norm_b = math.sqrt(sum(float(v.square().sum()) for v in eb.values()))
    assert ta.dot(tb) == pytest.approx(dot, rel=1e-5)
    assert ta.norm() == pytest.approx(norm_a, rel=1e-6)
    assert ta.cosine(tb) == pytest.approx(dot / (norm_a * norm_b), rel=1e-5)

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


def test_task_vector_keeps_linearization_and_base_hash(two_adapters):
    from delta_trl.merging.task_vector import TaskVector

    a, b = two_adapters
    fingerprint = base_model_fingerprint(make_llama())
    mark(a, **LINEAR, base_model_sha256=fingerprint)
    ta, tb = TaskVector.from_adapter(a), TaskVector.from_adapter(b)
    assert (ta.evaluate_linearized, ta.base_model_sha256) == (True, fingerprint)
    with pytest.raises(ValueError, match="linearized task vector"):
        ta + tb
    double = ta + ta
    assert (double.evaluate_linearized, double.base_model_sha256) == (True, fingerprint)
    model = make_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="`linear` mode"):
        (2.0 * ta).apply_to(model)

    mark(a, base_model_sha256=fingerprint)
    mark(b, base_model_sha256=base_model_fingerprint(make_llama(seed=1)))
    ta, tb = TaskVector.from_adapter(a), TaskVector.from_adapter(b)
    with pytest.raises(ValueError, match="different base models"):
        ta - tb
    with pytest.raises(ValueError, match="not the base model"):
        tb.apply_to(model)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    assert ta.apply_to(model) is model  # the recorded base: folded
    assert not torch.equal(
        model.model.layers[0].self_attn.q_proj.weight, before["model.layers.0.self_attn.q_proj.weight"]
    )


def test_base_from_a_folder_is_loaded_in_the_recorded_dtype(two_adapters, tmp_path):
    """An fp32 checkpoint trained on in bf16: the adapters record the bf16 hash and dtype, so the fold loads bf16."""
    from delta_trl.core.fingerprint import base_model_dtype

    a, b = two_adapters
    make_llama().save_pretrained(tmp_path / "base")
    trained_on = LlamaForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.bfloat16)
    assert base_model_dtype(trained_on) == "bfloat16"
    assert base_model_dtype(make_llama()) == "float32"
    for folder in (a, b):
        mark(folder, base_model_sha256=base_model_fingerprint(trained_on), base_model_dtype="bfloat16")
    result = merge_adapters([a, b], None, tmp_path / "m", fold_into_base=True, base_model=str(tmp_path / "base"))
    folded = LlamaForCausalLM.from_pretrained(result.output_dir, dtype="auto")
    assert folded.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    for folder in (a, b):  # without the recorded dtype the default (fp32) load is another θ0
        mark(folder, base_model_sha256=base_model_fingerprint(trained_on))
    with pytest.raises(ValueError, match=r"all its weights in float32 is"):
        merge_adapters([a, b], None, tmp_path / "m2", fold_into_base=True, base_model=str(tmp_path / "base"))
