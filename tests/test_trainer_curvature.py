"""The curvature penalty inside both trainers: the exact term, accumulation, estimation on first use, config errors."""

import json

import pytest
import torch
from conftest import addition_rows, delta_config, make_llama
from datasets import Dataset
from peft import LoraConfig
from torch.testing import assert_close
from transformers import DataCollatorForSeq2Seq

from delta_trl import DeltaConfig, DeltaDPOConfig, DeltaDPOTrainer, DeltaTrainer
from delta_trl.core.adapters import unparked
from delta_trl.curvature.factors import curvature_penalty


LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0}
TEXTS = [f"The number {i} is followed by {i + 1}, and the capital of France is Paris." for i in range(12)]


@pytest.fixture
def reference_file(tmp_path):
    path = tmp_path / "reference.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return path


def _trainer(tokenizer, tmp_path, **config):
    torch.manual_seed(0)
    return DeltaTrainer(
        model=make_llama(initializer_range=0.2),
        args=delta_config(
            tmp_path, per_device_eval_batch_size=4, curvature_num_samples=12, curvature_max_length=32, **config
        ),  # fmt: skip
        train_dataset=Dataset.from_list(addition_rows(tokenizer, n=8)),
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True),
        processing_class=tokenizer,
        peft_config=LoraConfig(**LORA),
    )


def _randomize(model):
    torch.manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.2)


def test_estimated_on_first_use_then_loaded(tiny_tokenizer, tmp_path, reference_file):
    cache = tmp_path / "curvature"
    first = _trainer(tiny_tokenizer, tmp_path, curvature_weight=10.0, curvature_path=str(cache),
                     curvature_dataset=str(reference_file))  # fmt: skip
    assert (cache / "curvature.safetensors").is_file()
    assert (cache / "curvature.json").is_file()
    second = _trainer(tiny_tokenizer, tmp_path, curvature_weight=10.0, curvature_path=str(cache))
    for name, layer in first._curvature.layers.items():
        for key, tensor in layer.tensors.items():
            assert_close(second._curvature.layers[name].tensors[key], tensor)


@pytest.mark.parametrize("mode", ["delta", "curvature_only"])
def test_penalty_term_is_exact(mode, tiny_tokenizer, tmp_path, reference_file):
    cache = tmp_path / "curvature"
    common = {"curvature_path": str(cache), "curvature_dataset": str(reference_file), "alpha_sampling": "fixed"}
    with_penalty = _trainer(tiny_tokenizer, tmp_path, delta_mode=mode, curvature_weight=7.0, **common)
    without = _trainer(tiny_tokenizer, tmp_path, delta_mode="kd_only" if mode == "delta" else "nonlinear")
    _randomize(with_penalty.model)
    without.model.load_state_dict(with_penalty.model.state_dict())
    batch = with_penalty._prepare_inputs(next(iter(with_penalty.get_train_dataloader())))
    n = (batch["labels"][:, 1:] != -100).sum()
    model = with_penalty.model
    model.train()
    without.model.train()
    expected_penalty = curvature_penalty(model, with_penalty._curvature, "default")
    if mode == "delta":
        with unparked(model, "delta_teacher"):
            expected_penalty = expected_penalty + curvature_penalty(model, with_penalty._curvature, "delta_teacher")
    else:
        assert "delta_teacher" not in model.peft_config
    assert expected_penalty > 0
    got = with_penalty.compute_loss(model, batch, num_items_in_batch=n)
    base = without.compute_loss(without.model, batch, num_items_in_batch=n)
    assert_close(got, base + 7.0 * expected_penalty, rtol=1e-5, atol=1e-6)
    assert with_penalty._metrics["train"]["delta/curvature_penalty"][0] == pytest.approx(
        expected_penalty.item(), rel=1e-5
    )


def test_penalty_is_counted_once_per_optimizer_step_under_accumulation(tiny_tokenizer, tmp_path, reference_file):
    common = {"curvature_path": str(tmp_path / "c"), "curvature_dataset": str(reference_file), "max_steps": 1,
              "optim": "sgd", "learning_rate": 0.5, "lr_scheduler_type": "constant", "max_grad_norm": 0.0,
              "delta_mode": "curvature_only", "curvature_weight": 50.0}  # fmt: skip
    params = []
    for batch, accumulation in ((4, 1), (2, 2)):
        trainer = _trainer(tiny_tokenizer, tmp_path / str(batch), per_device_train_batch_size=batch,
                           gradient_accumulation_steps=accumulation, **common)  # fmt: skip
        trainer.train_dataset = trainer.train_dataset.select(range(4))
        with torch.no_grad():  # a non-zero student, so that the penalty has a gradient from the first step
            for name, param in trainer.model.named_parameters():
                if ".lora_B." in name:
                    param.fill_(0.05)
        trainer.train()
        params.append({k: p.detach().clone() for k, p in trainer.model.named_parameters() if "lora_" in k})
    for key in params[0]:
        assert_close(params[1][key], params[0][key], rtol=1e-5, atol=1e-6)


def test_dpo_curvature_only_adds_the_student_penalty(tiny_tokenizer, tmp_path, reference_file):
    from test_delta_dpo_trainer import COMMON, preference_rows

    def build(mode, **extra):
        torch.manual_seed(0)
        return DeltaDPOTrainer(
            model=make_llama(initializer_range=0.2),
            args=DeltaDPOConfig(output_dir=str(tmp_path / mode), delta_mode=mode, **{**COMMON, **extra}),
            train_dataset=Dataset.from_list(preference_rows(8)),
            processing_class=tiny_tokenizer,
            peft_config=LoraConfig(**LORA),
        )

    curvature = build("curvature_only", curvature_weight=3.0, curvature_path=str(tmp_path / "c"),
                      curvature_dataset=str(reference_file), curvature_num_samples=12, curvature_max_length=32)  # fmt: skip
    plain = build("nonlinear")
    _randomize(curvature.model)
    plain.model.load_state_dict(curvature.model.state_dict())
    batch = curvature._prepare_inputs(next(iter(curvature.get_train_dataloader())))
    curvature.model.train()
    plain.model.train()
    penalty = curvature_penalty(curvature.model, curvature._curvature, "default")
    got = curvature.compute_loss(curvature.model, batch)
    assert_close(got, plain.compute_loss(plain.model, batch) + 3.0 * penalty, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"delta_mode": "kd_only", "curvature_weight": 1.0, "curvature_path": "c"}, "without the curvature penalty"),
        ({"delta_mode": "curvature_only"}, "needs curvature_weight > 0"),
        ({"curvature_weight": 1.0}, "needs `curvature_path`"),
        ({"delta_mode": "linear", "curvature_weight": 1.0, "curvature_path": "c"}, "has no curvature penalty"),
        ({"curvature_estimator": "diag"}, "curvature_estimator='diag'"),
    ],
)
def test_curvature_config_errors(overrides, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        DeltaConfig(output_dir=str(tmp_path), use_cpu=True, **overrides)


def test_missing_cache_without_reference_is_refused_at_build(tiny_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="(?i)no .*cache|reference"):
        _trainer(tiny_tokenizer, tmp_path, curvature_weight=1.0, curvature_path=str(tmp_path / "missing"))
