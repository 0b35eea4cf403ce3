"""DeltaSFTTrainer: parity with TRL's SFTTrainer, TRL's three dataset formats, the loss assembled from the pure
functions (= DeltaTrainer's), refusals, and a stock TRL script with only the import changed."""

import json
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import delta_config, make_llama, make_tokenizer
from datasets import Dataset
from peft import LoraConfig
from safetensors.torch import load_file
from torch.testing import assert_close
from transformers import MixtralConfig, MixtralForCausalLM
from trl import SFTConfig, SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from delta_trl import DeltaSFTConfig, DeltaSFTTrainer, DeltaTrainer
from delta_trl.core.adapters import scaled_adapters, unparked
from delta_trl.core.linearize import linearized_forward
from delta_trl.core.losses import hidden_distillation_loss, supervised_mask, token_cross_entropy


TESTS = Path(__file__).resolve().parent
# A minimal chat template; the assistant's reply (and its end of turn) is inside {% generation %} for
# `assistant_only_loss`.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] + ': ' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)
COMMON = {
    "use_cpu": True,
    "bf16": False,
    "report_to": "none",
    "per_device_train_batch_size": 4,
    "max_steps": 2,
    "learning_rate": 1e-2,
    "logging_steps": 1,
    "save_strategy": "no",
    "disable_tqdm": True,
    "seed": 0,
    "dataloader_num_workers": 0,
    "max_length": 32,
    "gradient_checkpointing": False,
}


def _rows(kind: str, n: int = 8) -> list[dict]:
    rows = []
    for i in range(n):
        a, b = i % 7, (3 * i) % 5
        question, answer = f"What is {a} + {b}?" + " please" * (i % 3), f" {a + b}" + "!" * (i % 2)
        if kind == "language_modeling":
            rows.append({"text": question + answer})
        elif kind == "prompt_completion":
            rows.append({"prompt": question, "completion": answer})
        else:  # conversational
            rows.append(
                {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
            )
    return rows


def _tokenizer():
    tokenizer = make_tokenizer(vocab_size=300)  # a fresh one: TRL sets its pad token, the tests a chat template
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _lora():
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", lora_dropout=0.0)


def _trainer(
    tmp_path,
    kind="prompt_completion",
    trainer_class=DeltaSFTTrainer,
    config_class=DeltaSFTConfig,
    extra=None,
    **config,
):
    return trainer_class(
        model=make_llama(seed=0),
        args=config_class(output_dir=str(tmp_path / "out"), **{**COMMON, **config}),
        train_dataset=Dataset.from_list(_rows(kind)),
        processing_class=_tokenizer(),
        peft_config=_lora(),
        **(extra or {}),
    )


def _lora_weights(model):
    return {k: p.detach().clone() for k, p in model.named_parameters() if "lora_" in k}


def test_nonlinear_mode_equals_sft_trainer(tmp_path):
    sgd = {"optim": "sgd", "learning_rate": 0.5, "lr_scheduler_type": "constant", "max_grad_norm": 0.0}
    delta = _trainer(tmp_path / "delta", delta_mode="nonlinear", **sgd)
    stock = _trainer(tmp_path / "stock", trainer_class=SFTTrainer, config_class=SFTConfig, **sgd)
    for trainer in (delta, stock):
        trainer.train()
    logged = [[{k: v for k, v in e.items() if k not in ("train_runtime", "train_samples_per_second",
               "train_steps_per_second")} for e in t.state.log_history] for t in (delta, stock)]  # fmt: skip
    assert logged[0] == logged[1]
    assert len(logged[0]) == 3
    assert {"loss", "entropy", "mean_token_accuracy", "num_tokens"} <= set(logged[0][0])
    weights, reference = _lora_weights(delta.model), _lora_weights(stock.model)
    assert weights.keys() == reference.keys()
    assert any(weights[k].abs().max() > 0 for k in weights if ".lora_B." in k)
    for key in weights:
        assert_close(weights[key], reference[key], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kind", "extra"),
    [
        ("language_modeling", {}),
        ("prompt_completion", {}),  # completion_only_loss defaults to True for this format
        ("conversational", {}),
        ("conversational", {"assistant_only_loss": True}),
    ],
)
def test_every_dataset_format_trains_in_delta_mode(kind, extra, tmp_path):
    trainer = _trainer(tmp_path, kind=kind, alpha_sampling="uniform", **extra)
    batch = next(iter(trainer.get_train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    attended = batch["attention_mask"].bool()
    unsupervised = (batch["labels"] == -100) & attended
    masked = kind == "prompt_completion" or extra.get("assistant_only_loss", False)
    assert unsupervised.any().item() is masked  # TRL's completion / assistant mask is in the labels
    trainer.train()
    teacher = {k: v for k, v in _lora_weights(trainer.model).items() if ".delta_teacher." in k}
    assert teacher
    assert any(v.abs().max() > 0 for k, v in teacher.items() if ".lora_B." in k)
    logged = trainer.state.log_history[0]
    for key in ("delta/task_loss", "delta/teacher_loss", "delta/distill_loss", "delta/alpha", "mean_token_accuracy"):
        assert key in logged, (key, logged)
    assert logged["num_tokens"] == attended.sum().item()
    assert torch.isfinite(torch.tensor(logged["loss"]))


def _randomize_adapters(model):
    torch.manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.2)


def test_delta_loss_is_the_sum_of_the_pure_terms_and_delta_trainers(tmp_path):
    weights = {"alpha_sampling": "uniform", "alpha_min": 1.3, "alpha_max": 1.7, "distill_weight": 0.7}
    trainer = _trainer(tmp_path, kind="conversational", assistant_only_loss=True, teacher_loss_weight=0.4, **weights)
    model = trainer.model
    _randomize_adapters(model)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    labels = batch["labels"]
    n = supervised_mask(labels, shift=True).sum()
    alpha = trainer._current_alpha()
    assert 1.3 <= alpha <= 1.7
    model.train()
    loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=n)
    # keys TRL's preparation or a custom collator may add that are not model inputs: the labels already hold them
    extra = {"completion_mask": batch["attention_mask"], "assistant_masks": batch["attention_mask"], "use_cache": True}
    seen = []
    hook = model.get_base_model().register_forward_pre_hook(
        lambda m, a, kw: seen.append({k for k, v in kw.items() if v is not None}), with_kwargs=True
    )
    try:
        assert_close(trainer.compute_loss(model, {**batch, **extra}, num_items_in_batch=n), loss, rtol=0, atol=0)
    finally:
        hook.remove()
    assert len(seen) >= 2  # the student's forward and the teacher's JVP
    assert not any({"completion_mask", "assistant_masks", "labels"} & keys for keys in seen), seen
    assert all(keys >= {"use_cache", "attention_mask"} for keys in seen), seen

    # the same quantities, computed independently
    model.eval()
    with scaled_adapters(model, {"default": alpha}):
        student = model(**batch, output_hidden_states=True)
    with unparked(model, "delta_teacher"):
        teacher = linearized_forward(model, batch, "delta_teacher")
    mask = supervised_mask(labels, shift=True)
    expected = (
        token_cross_entropy(student.logits, labels, shift=True, num_items=n)
        + 0.7 * hidden_distillation_loss(student.hidden_states[-1], teacher.hidden(alpha)[0], mask, num_items=n)
        + 0.4 * token_cross_entropy(teacher.logits(alpha), labels, shift=True, num_items=n)
    )
    assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    # TRL's token metrics, from the student's supervised rows (its LM head ran on those only)
    targets = labels[:, 1:]
    supervised = student.logits[:, :-1][targets != -100].log_softmax(-1)
    accuracy = (supervised.argmax(-1) == targets[targets != -100]).float().mean()
    entropy = -(supervised.exp() * supervised).sum(-1).mean()
    assert trainer._metrics["train"]["mean_token_accuracy"][0] == pytest.approx(float(accuracy))
    assert trainer._metrics["train"]["entropy"][0] == pytest.approx(float(entropy), rel=1e-5)

    # ... and DeltaTrainer's causal-LM loss on the same tokenized batch, with the same adapters
    reference = DeltaTrainer(
        model=make_llama(seed=0),
        args=delta_config(tmp_path / "ref", teacher_loss_weight=0.4, **weights),
        train_dataset=Dataset.from_list([{k: v[0].tolist() for k, v in batch.items()}]),
        peft_config=_lora(),
    )
    reference.model.load_state_dict(model.state_dict())
    assert reference._current_alpha() == alpha
    reference.model.train()
    assert_close(reference.compute_loss(reference.model, dict(batch), num_items_in_batch=n), loss, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["delta", "kd_only", "linear"])
def test_every_mode_evaluates_and_saves_the_student(mode, tmp_path):
    trainer = _trainer(
        tmp_path, delta_mode=mode, extra={"eval_dataset": Dataset.from_list(_rows("prompt_completion"))}
    )
    trainer.train()
    metrics = trainer.evaluate()
    key = "eval_delta/teacher_loss" if mode == "linear" else "eval_delta/task_loss"
    assert metrics["eval_loss"] == pytest.approx(metrics[key], rel=1e-5)
    assert "eval_mean_token_accuracy" in metrics
    trainer.save_model()
    marker = json.loads((tmp_path / "out" / "delta_trl.json").read_text())
    assert (marker["delta_mode"], marker["evaluate_linearized"]) == (mode, mode == "linear")
    assert not any("teacher" in k for k in load_file(tmp_path / "out" / "adapter_model.safetensors"))


def test_resume_continues_exactly(tmp_path):
    common = {"max_steps": 4, "save_strategy": "steps", "save_steps": 2, "alpha_sampling": "uniform"}
    full = _trainer(tmp_path / "full", **common)
    full.train()
    checkpoint = tmp_path / "full" / "out" / "checkpoint-2"
    assert (checkpoint / "delta_teacher.safetensors").is_file()
    resumed = _trainer(tmp_path / "resumed", **common)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    expected, got = _lora_weights(full.model), _lora_weights(resumed.model)
    assert any(".delta_teacher." in k for k in got)
    for key in expected:
        assert_close(got[key], expected[key], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    ("option", "match"),
    [
        ({"packing": True}, "packing=True is not supported with delta_mode='delta': packed documents"),
        ({"padding_free": True}, "padding_free=True .*flash-attention"),
        ({"loss_type": "dft"}, "loss_type='dft' .*token cross-entropy"),
        ({"eval_packing": True}, "eval_packing=True"),
        ({"use_liger_kernel": True}, "use_liger_kernel"),
    ],
)
def test_options_the_delta_loss_cannot_honour_are_refused_at_build_time(option, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        DeltaSFTConfig(output_dir=str(tmp_path), **COMMON, **option)
    DeltaSFTConfig(output_dir=str(tmp_path), delta_mode="nonlinear", **COMMON, **option)  # SFTTrainer unchanged


def test_refusals_of_the_trainer(tmp_path):
    with pytest.raises(TypeError, match="DeltaSFTConfig"):
        DeltaSFTTrainer(model=make_llama(), args=SFTConfig(output_dir=str(tmp_path), **COMMON))
    with pytest.raises(ValueError, match="compute_loss_func"):
        _trainer(tmp_path, extra={"compute_loss_func": lambda outputs, labels, num_items_in_batch=None: outputs.loss})
    with pytest.raises(ValueError, match="padding-free"):
        _trainer(tmp_path, extra={"data_collator": DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)})
    tiny_moe = MixtralConfig(
        vocab_size=300, hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1,
    )  # fmt: skip
    with pytest.raises(ValueError, match="router_aux_loss_coef=0.0"):  # TRL would add a loss DELTA does not
        DeltaSFTTrainer(
            model=MixtralForCausalLM(tiny_moe),
            args=DeltaSFTConfig(output_dir=str(tmp_path), **COMMON),
            train_dataset=Dataset.from_list(_rows("language_modeling")),
            processing_class=_tokenizer(),
            peft_config=_lora(),
        )
    with pytest.raises(ValueError, match="peft_config"):  # DELTA trains LoRA adapters
        DeltaSFTTrainer(
            model=make_llama(),
            args=DeltaSFTConfig(output_dir=str(tmp_path), **COMMON),
            train_dataset=Dataset.from_list(_rows("language_modeling")),
            processing_class=_tokenizer(),
        )


STOCK_SCRIPT = """
from conftest import make_llama, make_tokenizer
from datasets import Dataset
from peft import LoraConfig, PeftModel

from delta_trl import DeltaSFTConfig as SFTConfig, DeltaSFTTrainer as SFTTrainer  # was: from trl import ...

dataset = Dataset.from_list([{"prompt": f"What is {i} + 1?", "completion": f" {i + 1}"} for i in range(4)])
training_args = SFTConfig(
    output_dir=OUTPUT_DIR, max_steps=2, per_device_train_batch_size=2, max_length=32,
    use_cpu=True, bf16=False, report_to="none", disable_tqdm=True,
)
trainer = SFTTrainer(
    model=make_llama(),
    args=training_args,
    train_dataset=dataset,
    processing_class=make_tokenizer(300),
    peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
)
trainer.train()
trainer.save_model()
PeftModel.from_pretrained(make_llama(), OUTPUT_DIR)  # the student, stock PEFT format
print("trained", type(trainer).__name__, training_args.delta_mode, training_args.gradient_checkpointing)
"""


def test_a_stock_trl_script_with_only_the_import_changed_runs(tmp_path, capsys, monkeypatch):
    """The script runs as `python script.py` would (its own globals, __name__ == "__main__"), in this process: a
    subprocess would spend its time importing torch and TRL again."""
    monkeypatch.chdir(tmp_path)
    script = f"OUTPUT_DIR = {str(tmp_path / 'out')!r}\n" + textwrap.dedent(STOCK_SCRIPT)
    exec(compile(script, "stock_sft_script.py", "exec"), {"__name__": "__main__"})
    assert "trained DeltaSFTTrainer delta True" in capsys.readouterr().out
    assert (tmp_path / "out" / "delta_trl.json").is_file()
