"""Every switch a TRL/PEFT user flips, compared by gradients and final weights, and every refused combination."""

import pytest
import torch
from conftest import addition_rows, delta_config, make_llama, make_t5
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from test_delta_dpo_trainer import COMMON, LORA, preference_rows
from torch.testing import assert_close
from transformers import DataCollatorForSeq2Seq

from delta_trl import DeltaConfig, DeltaDPOConfig, DeltaDPOTrainer, DeltaTrainer


ONE_SGD_STEP = {"optim": "sgd", "learning_rate": 1.0, "lr_scheduler_type": "constant", "max_grad_norm": 0.0}
MODELS = {"llama": (make_llama, ["q_proj", "v_proj"], "CAUSAL_LM"), "t5": (make_t5, ["q", "v"], "SEQ_2_SEQ_LM")}


def _lora(kind: str, **overrides) -> LoraConfig:
    _, targets, task = MODELS[kind]
    return LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": targets, "task_type": task, "lora_dropout": 0.0,
                         **overrides})  # fmt: skip


def _sft_trainer(kind, tokenizer, tmp_path, model=None, n=4, **config):
    torch.manual_seed(0)
    return DeltaTrainer(
        model=model if model is not None else get_peft_model(MODELS[kind][0](), _lora(kind)),
        args=delta_config(tmp_path, **config),
        train_dataset=Dataset.from_list(addition_rows(tokenizer, n=n, seq2seq=kind == "t5")),
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True),
    )


def _dpo_trainer(tokenizer, tmp_path, model=None, **config):
    torch.manual_seed(0)
    model = model if model is not None else get_peft_model(make_llama(initializer_range=0.2), LoraConfig(**LORA))
    return DeltaDPOTrainer(
        model=model,
        args=DeltaDPOConfig(output_dir=str(tmp_path / "out"), **{**COMMON, **config}),
        train_dataset=Dataset.from_list(preference_rows(4)),
        processing_class=tokenizer,
    )


def _lora_weights(trainer) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in trainer.model.named_parameters() if "lora_" in k}


def _alphas(trainer) -> list[float]:
    return [entry["delta/alpha"] for entry in trainer.state.log_history if "delta/alpha" in entry]


def _assert_same_updates(got: dict, expected: dict, initial: dict) -> None:
    """Equal SGD updates (= gradients) to 1e-4 of the largest: fp32 recomputation reorders sums, a wrong α is 1 %."""
    updates = {k: expected[k] - initial[k] for k in initial}
    largest = max(u.abs().max().item() for k, u in updates.items() if ".delta_teacher." not in k)
    assert largest > 1e-2  # the student moved
    for key, update in updates.items():
        assert_close(got[key] - initial[key], update, rtol=1e-4, atol=1e-5 * largest, msg=key)


def _randomize_students(model) -> None:
    """A non-zero student B: at B = 0 a wrong α in the recomputed forward would change nothing."""
    torch.manual_seed(4)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B.default." in name:
                param.normal_(0, 0.3)


def _checkpointing_changes_nothing(build) -> None:
    """One SGD step at a sampled α ≠ 1 with and without gradient checkpointing: the same α, the same updates."""
    weights, alphas = {}, {}
    for checkpointing in (False, True):
        trainer = build(checkpointing)
        _randomize_students(trainer.model)
        initial = _lora_weights(trainer)
        trainer.train()
        weights[checkpointing], alphas[checkpointing] = _lora_weights(trainer), _alphas(trainer)
    assert alphas[True] == alphas[False]
    assert abs(alphas[True][0] - 1) > 0.1
    _assert_same_updates(weights[True], weights[False], initial)


GC_STEP = {"max_steps": 1, "alpha_sampling": "uniform", **ONE_SGD_STEP}


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_gradient_checkpointing_at_alpha_not_one_takes_the_same_step(kind, tiny_tokenizer, tmp_path):
    """The recomputed forward must run at the step's α (it ran at α = 1, 1–2.5 % off, before the fix)."""
    _checkpointing_changes_nothing(
        lambda checkpointing: _sft_trainer(
            kind, tiny_tokenizer, tmp_path / str(checkpointing), gradient_checkpointing=checkpointing, **GC_STEP
        )
    )


def test_trl_sft_gradient_checkpointing_at_alpha_not_one_takes_the_same_step(tiny_tokenizer, tmp_path):
    from delta_trl import DeltaSFTConfig, DeltaSFTTrainer

    rows = [{"prompt": f"What is {i % 7} + {i % 5}?", "completion": f" {i % 7 + i % 5}"} for i in range(4)]

    def build(checkpointing):
        torch.manual_seed(0)
        return DeltaSFTTrainer(
            model=get_peft_model(make_llama(), _lora("llama")),
            args=DeltaSFTConfig(output_dir=str(tmp_path / str(checkpointing)), use_cpu=True, bf16=False,
                                report_to="none", per_device_train_batch_size=4, max_length=32, logging_steps=1,
                                save_strategy="no", disable_tqdm=True, seed=0,
                                gradient_checkpointing=checkpointing, **GC_STEP),
            train_dataset=Dataset.from_list(rows),
            processing_class=tiny_tokenizer,
        )  # fmt: skip

    _checkpointing_changes_nothing(build)


def test_dpo_gradient_checkpointing_at_alpha_not_one_takes_the_same_step(tiny_tokenizer, tmp_path):
    _checkpointing_changes_nothing(
        lambda checkpointing: _dpo_trainer(
            tiny_tokenizer, tmp_path / str(checkpointing), gradient_checkpointing=checkpointing, **GC_STEP
        )
    )


def test_resume_with_a_custom_adapter_name_is_exact(tiny_tokenizer, tmp_path):
    """The checkpoint loader's set_adapter("task") used to deactivate and freeze the teacher: resume then crashed."""
    common = {"max_steps": 4, "save_strategy": "steps", "save_steps": 2, "alpha_sampling": "uniform"}

    def build(folder):
        model = get_peft_model(make_llama(), _lora("llama"), adapter_name="task")
        return _sft_trainer("llama", tiny_tokenizer, folder, model=model, n=16, learning_rate=3e-2, **common)

    full = build(tmp_path / "full")
    full.train()
    expected = _lora_weights(full)
    assert any(".task." in k for k in expected)
    assert any(".delta_teacher." in k for k in expected)
    checkpoint = tmp_path / "full" / "out" / "checkpoint-2"
    assert (checkpoint / "task" / "adapter_model.safetensors").is_file()
    resumed = build(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    got = _lora_weights(resumed)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert_close(got[key], value, rtol=1e-5, atol=1e-7, msg=key)
    model = resumed.accelerator.unwrap_model(resumed.model)
    assert all(p.requires_grad for k, p in model.named_parameters() if ".delta_teacher." in k)


def test_dpo_refuses_an_adapter_trl_cannot_reference(tiny_tokenizer, tmp_path):
    """TRL's DPOTrainer copies the adapter named "default" as its reference (a KeyError deep inside otherwise)."""
    model = get_peft_model(make_llama(), LoraConfig(**LORA), adapter_name="task")
    with pytest.raises(ValueError, match=r"adapters are \['task'\]. Load the adapter as 'default'"):
        _dpo_trainer(tiny_tokenizer, tmp_path, model=model)


@pytest.mark.parametrize("mode", ["delta", "linear", "curvature_only", "kd_only"])
def test_refused_lora_configurations(mode, tiny_tokenizer, tmp_path):
    extra = {"curvature_weight": 1.0, "curvature_path": str(tmp_path / "c")} if mode == "curvature_only" else {}

    def build(lora, model=None):
        return _sft_trainer("llama", tiny_tokenizer, tmp_path, model=get_peft_model(model or make_llama(), lora),
                            delta_mode=mode, **extra)  # fmt: skip

    with pytest.raises(ValueError, match=r"modules_to_save=\['lm_head'\] trains whole modules"):
        build(_lora("llama", modules_to_save=["lm_head"]))
    with pytest.raises(ValueError, match="bias='all'"):
        build(_lora("llama", bias="all"))
    if mode == "curvature_only":
        return
    with pytest.raises(ValueError, match="targets the input embeddings"):
        build(_lora("llama", target_modules=["q_proj", "embed_tokens"]))
    quantized = make_llama()
    quantized.config.quantization_config = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    with pytest.raises(ValueError, match=r"quantized \(bitsandbytes\); quantized layers have no forward-mode AD"):
        build(_lora("llama"), model=quantized)


def test_a_quantized_base_is_fine_for_plain_lora(tiny_tokenizer, tmp_path):
    """Only the modes that linearize refuse it: `nonlinear` is QLoRA as TRL runs it."""
    quantized = make_llama()
    quantized.config.quantization_config = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    trainer = _sft_trainer("llama", tiny_tokenizer, tmp_path, delta_mode="nonlinear",
                           model=get_peft_model(quantized, _lora("llama", modules_to_save=["lm_head"])))  # fmt: skip
    assert trainer._teacher_name is None


def test_refused_training_arguments(tmp_path):
    def config(**kwargs):
        return DeltaConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", **kwargs)

    with pytest.raises(ValueError, match="torch_compile recompiles the model for every new α"):
        config(torch_compile=True, alpha_sampling="uniform")
    assert config(torch_compile=True, alpha_sampling="fixed").torch_compile  # no moving α, nothing to recompile
    with pytest.raises(ValueError, match="task_loss_at_alpha=False runs the student at α = 1"):
        config(gradient_checkpointing=True, task_loss_at_alpha=False)
    with pytest.raises(ValueError, match="use_liger_kernel"):
        config(use_liger_kernel=True, delta_mode="linear")
    assert config(torch_compile=True, delta_mode="nonlinear").torch_compile


def test_dpo_options_the_delta_loss_does_not_implement_are_refused(tmp_path):
    def config(**kwargs):
        return DeltaDPOConfig(output_dir=str(tmp_path), **{**COMMON, **kwargs})

    assert config(loss_type="sigmoid").loss_type == ["sigmoid"]  # one name, as DPOConfig accepts it
    assert config(loss_type=["sigmoid"], loss_weights=[1.0]).loss_weights == [1.0]
    refused = {
        "loss_weights": ({"loss_weights": [0.5]}, r"loss_weights=\[0.5\] is not supported"),
        "label_smoothing": ({"label_smoothing": 0.1}, "label_smoothing=0.1 is not supported"),
        "padding_free": ({"padding_free": True}, "flash-attention has no forward-mode AD"),
        "loss_type": ({"loss_type": "hinge"}, r"loss_type=\['hinge'\] is not supported"),
        "use_weighting": ({"use_weighting": True}, "use_weighting=True is not supported"),
    }
    for kwargs, message in refused.values():
        with pytest.raises(ValueError, match=message):
            config(**kwargs)
        assert config(delta_mode="nonlinear", **kwargs).delta_mode == "nonlinear"


def test_saved_marker_identifies_the_base_by_content_and_files_honour_the_umask(tiny_tokenizer, tmp_path):
    """Two runs on bases that differ in one untargeted weight: their adapters cannot be merged, only folded into
    their own base."""
    import json
    import os

    from delta_trl.core.fingerprint import base_model_fingerprint
    from delta_trl.merging.merge import merge_adapters

    folders = {}
    previous = os.umask(0o027)
    try:
        for name, seed in (("a", 0), ("b", 0), ("other", 0)):
            base = make_llama(seed=seed)
            if name == "other":
                with torch.no_grad():
                    base.model.layers[1].mlp.down_proj.weight[0, 0] += 1.0  # not a LoRA target
            trainer = _sft_trainer("llama", tiny_tokenizer, tmp_path / name, model=get_peft_model(base, _lora("llama")),
                                   max_steps=1)  # fmt: skip
            trainer.train()
            trainer.save_model()
            folders[name] = tmp_path / name / "out"
            marker = json.loads((folders[name] / "delta_trl.json").read_text())
            assert marker["base_model_sha256"] == base_model_fingerprint(base)
            assert marker["base_model_dtype"] == "float32"
            for file in ("adapter_model.safetensors", "adapter_config.json", "delta_trl.json"):
                assert (folders[name] / file).stat().st_mode & 0o777 == 0o640, file
    finally:
        os.umask(previous)
    merge_adapters([folders["a"], folders["b"]], None, tmp_path / "merged")  # same θ0: fine
    with pytest.raises(ValueError, match="trained on different base models"):
        merge_adapters([folders["a"], folders["other"]], None, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
