"""DeltaTrainer: parity with Seq2SeqTrainer, the loss assembled from the pure functions, accumulation, resume, saving."""

import json
from pathlib import Path

import pytest
import torch
from conftest import addition_rows, delta_config, make_llama, make_t5
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch.testing import assert_close
from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer, Seq2SeqTrainingArguments

from delta_trl import DeltaTrainer
from delta_trl.core.adapters import scaled_adapters, unparked
from delta_trl.core.linearize import linearized_forward
from delta_trl.core.losses import hidden_distillation_loss, supervised_mask, token_cross_entropy


KINDS = {
    "llama": (make_llama, ["q_proj", "v_proj"], "CAUSAL_LM"),
    "t5": (make_t5, ["q", "v"], "SEQ_2_SEQ_LM"),
}


def _lora(kind, **kwargs):
    _, targets, task = KINDS[kind]
    return LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type=task, lora_dropout=0.0, **kwargs)


def _trainer(kind, tokenizer, tmp_path, n=16, seed=0, model_kwargs=None, **config):
    torch.manual_seed(seed)
    model = KINDS[kind][0](seed=seed, **(model_kwargs or {}))
    rows = addition_rows(tokenizer, n=n, seq2seq=kind == "t5")
    return DeltaTrainer(
        model=model,
        args=delta_config(tmp_path, **config),
        train_dataset=Dataset.from_list(rows),
        eval_dataset=Dataset.from_list(rows[:8]),
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True),
        peft_config=_lora(kind),
    )


def _batch(trainer):
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def _randomize_adapters(model):
    torch.manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.2)


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_nonlinear_mode_equals_seq2seq_trainer(kind, tiny_tokenizer, tmp_path):
    delta = _trainer(kind, tiny_tokenizer, tmp_path, delta_mode="nonlinear")
    _randomize_adapters(delta.model)
    reference_model = get_peft_model(KINDS[kind][0](), _lora(kind))
    reference_model.load_state_dict(delta.model.state_dict())
    reference = Seq2SeqTrainer(
        model=reference_model,
        args=Seq2SeqTrainingArguments(output_dir=str(tmp_path / "ref"), use_cpu=True, report_to="none"),
        data_collator=delta.data_collator,
    )
    batch = _batch(delta)
    n = supervised_mask(batch["labels"], shift=kind == "llama").sum()
    losses, grads = [], []
    for trainer in (delta, reference):
        trainer.model.train()
        loss = trainer.compute_loss(trainer.model, batch, num_items_in_batch=n)
        loss.backward()
        losses.append(loss.detach())
        grads.append({k: p.grad.clone() for k, p in trainer.model.named_parameters() if p.requires_grad})
    assert_close(losses[0], losses[1], rtol=0, atol=0)
    assert grads[0].keys() == grads[1].keys()
    for key in grads[0]:
        assert_close(grads[0][key], grads[1][key], rtol=0, atol=0)


@pytest.mark.parametrize(("kind", "normalization"), [("llama", "relative"), ("t5", "relative"), ("llama", "sum")])
def test_delta_loss_is_the_sum_of_the_pure_terms(kind, normalization, tiny_tokenizer, tmp_path):
    trainer = _trainer(
        kind, tiny_tokenizer, tmp_path, alpha_sampling="uniform", alpha_min=1.3, alpha_max=1.7,
        distill_weight=0.7, teacher_loss_weight=0.4, distill_normalization=normalization,
    )  # fmt: skip
    model = trainer.model
    _randomize_adapters(model)
    batch = _batch(trainer)
    shift = kind == "llama"
    n = supervised_mask(batch["labels"], shift=shift).sum()
    alpha = trainer._current_alpha()
    assert 1.3 <= alpha <= 1.7
    model.train()
    head_outputs = []
    head = model.get_output_embeddings().register_forward_hook(lambda *args: head_outputs.append(args[2].shape))
    loss = trainer.compute_loss(model, batch, num_items_in_batch=n)
    head.remove()
    vocab = model.get_output_embeddings().out_features
    assert head_outputs == [(n, vocab), (n, vocab)]  # teacher and student: the LM head on supervised rows only
    lora = [p for name, p in model.named_parameters() if "lora_" in name]
    grads = torch.autograd.grad(loss, lora)

    # the same quantities, computed independently
    model.eval()  # dropout is off in these configs; eval only makes the check independent of RNG state
    kwargs = {**batch, "output_hidden_states": True}
    with scaled_adapters(model, {"default": alpha}):
        student = model(**kwargs)
    with unparked(model, "delta_teacher"):
        teacher = linearized_forward(model, batch, "delta_teacher")
    student_hidden = student.decoder_hidden_states[-1] if kind == "t5" else student.hidden_states[-1]
    mask = supervised_mask(batch["labels"], shift=shift)
    expected = (
        token_cross_entropy(student.logits, batch["labels"], shift=shift, num_items=n)
        + 0.7
        * hidden_distillation_loss(
            student_hidden, teacher.hidden(alpha)[0], mask, num_items=n, normalization=normalization
        )
        + 0.4 * token_cross_entropy(teacher.logits(alpha), batch["labels"], shift=shift, num_items=n)
    )
    assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, torch.autograd.grad(expected, lora), strict=True):
        assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))  # fp32: the two sum in other orders
    assert trainer._metrics["train"]["delta/distill_loss"][0] > 0


def _train_one_step(kind, tokenizer, tmp_path, **config):
    trainer = _trainer(
        kind, tokenizer, tmp_path, n=4, max_steps=1, optim="sgd", learning_rate=0.5, lr_scheduler_type="constant",
        max_grad_norm=0.0, alpha_sampling="uniform", **config,
    )  # fmt: skip
    trainer.train()
    return {k: p.detach().clone() for k, p in trainer.model.named_parameters() if "lora_" in k}


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_gradient_accumulation_2x2_equals_batch_4(kind, tiny_tokenizer, tmp_path):
    one = _train_one_step(kind, tiny_tokenizer, tmp_path / "a", per_device_train_batch_size=4)
    two = _train_one_step(
        kind, tiny_tokenizer, tmp_path / "b", per_device_train_batch_size=2, gradient_accumulation_steps=2
    )
    moved = [k for k in one if ".lora_B." in k and one[k].abs().max() > 0]
    assert any(".delta_teacher." in k for k in moved)
    assert any(".default." in k for k in moved)
    for key in one:
        assert_close(one[key], two[key], rtol=1e-5, atol=1e-6)


def test_short_run_lowers_every_term_and_logs_them(tiny_tokenizer, tmp_path):
    trainer = _trainer(
        "llama", tiny_tokenizer, tmp_path, max_steps=30, learning_rate=3e-2, alpha_sampling="uniform",
        alpha_min=0.9, alpha_max=1.1, logging_steps=5, model_kwargs={"initializer_range": 0.2},
    )  # fmt: skip
    # (a larger initializer_range makes the tiny random model's logits sensitive enough to learn in 30 steps)
    base = {k: p.detach().clone() for k, p in trainer.model.named_parameters() if "lora_" not in k}
    trainer.train()
    logs = [h for h in trainer.state.log_history if "delta/task_loss" in h]
    assert len(logs) == 6
    for key in ("delta/task_loss", "delta/teacher_loss"):
        assert logs[-1][key] < logs[0][key] - 0.5, key
    assert all(0.9 <= h["delta/alpha"] <= 1.1 for h in logs)
    assert all("delta/distill_loss" in h for h in logs)
    after = dict(trainer.model.named_parameters())
    assert all(torch.equal(base[k], after[k]) for k in base)  # base weights frozen
    metrics = trainer.evaluate()
    logged = trainer.state.log_history[-1]
    assert logged["eval_delta/task_loss"] == pytest.approx(metrics["eval_loss"], rel=1e-5)


def test_evaluation_is_the_student_alone_at_alpha_one(tiny_tokenizer, tmp_path):
    trainer = _trainer("t5", tiny_tokenizer, tmp_path)
    _randomize_adapters(trainer.model)
    reference = Seq2SeqTrainer(
        model=trainer.model,  # the teacher is parked: a plain forward is the student
        args=Seq2SeqTrainingArguments(output_dir=str(tmp_path / "ref"), use_cpu=True, report_to="none"),
        data_collator=trainer.data_collator,
        eval_dataset=trainer.eval_dataset,
    )
    ours, theirs = trainer.evaluate()["eval_loss"], reference.evaluate()["eval_loss"]
    assert ours == pytest.approx(theirs, rel=1e-6)
    with trainer.model.disable_adapter():
        base_loss = reference.evaluate()["eval_loss"]
    assert abs(base_loss - ours) > 1e-3  # the student adapter is not vacuous


def test_resume_continues_exactly_and_final_save_is_the_student(tiny_tokenizer, tmp_path):
    common = {
        "max_steps": 6,
        "save_strategy": "steps",
        "save_steps": 3,
        "alpha_sampling": "uniform",
        "learning_rate": 3e-2,
    }
    full = _trainer("llama", tiny_tokenizer, tmp_path / "full", **common)
    full.train()
    expected = {k: p.detach().clone() for k, p in full.model.named_parameters() if "lora_" in k}

    checkpoint = tmp_path / "full" / "out" / "checkpoint-3"
    assert (checkpoint / "delta_teacher.safetensors").is_file()
    assert not (checkpoint / "delta_teacher").exists()  # not a PEFT sub-adapter: the Trainer would deactivate it

    resumed = _trainer("llama", tiny_tokenizer, tmp_path / "resumed", **common)
    resumed.args.output_dir = str(tmp_path / "full" / "out")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    got = {k: p.detach() for k, p in resumed.model.named_parameters() if "lora_" in k}
    assert any(".delta_teacher." in k for k in got)
    for key in expected:
        assert_close(got[key], expected[key], rtol=1e-5, atol=1e-7)

    final = tmp_path / "final"
    full.save_model(str(final))
    weights = load_file(final / "adapter_model.safetensors")
    assert weights
    assert not any("teacher" in k for k in weights)
    assert not (final / "delta_teacher").exists()
    assert not (final / "delta_teacher.safetensors").exists()
    assert json.loads((final / "delta_trl.json").read_text())["delta_mode"] == "delta"
    assert "delta_teacher" in full.model.peft_config  # saving did not remove it from the live model

    loaded = PeftModel.from_pretrained(make_llama(), final)
    ids = torch.tensor([[5, 6, 7, 8]])
    full.model.eval()
    assert_close(loaded(input_ids=ids).logits, full.model(input_ids=ids).logits)


def test_linear_mode_trains_and_evaluates_the_linearized_model(tiny_tokenizer, tmp_path):
    trainer = _trainer("llama", tiny_tokenizer, tmp_path, delta_mode="linear", max_steps=3)
    assert list(trainer.model.peft_config) == ["default"]  # no teacher: the adapter itself is the tangent
    trainer.train()
    eval_loss = trainer.evaluate()["eval_loss"]
    batch = trainer._prepare_inputs(next(iter(trainer.get_eval_dataloader())))
    with torch.no_grad():
        expected = token_cross_entropy(
            linearized_forward(trainer.model, batch, "default").logits(), batch["labels"], shift=True
        )
        nonlinear = trainer.model(**batch).loss
    assert eval_loss == pytest.approx(expected.item(), rel=1e-5)
    assert abs(nonlinear.item() - eval_loss) > 1e-4
    trainer.save_model()
    marker = json.loads((tmp_path / "out" / "delta_trl.json").read_text())
    assert marker["evaluate_linearized"] is True
    assert marker["delta_mode"] == "linear"


def test_bad_inputs_fail_when_the_trainer_is_built(tiny_tokenizer, tmp_path):
    rows = Dataset.from_list(addition_rows(tiny_tokenizer, n=4))
    build = {"args": delta_config(tmp_path), "train_dataset": rows}
    with pytest.raises(ValueError, match="peft_config"):
        DeltaTrainer(model=make_llama(), **build)
    with pytest.raises(ValueError, match="DoRA"):
        DeltaTrainer(model=make_llama(), peft_config=_lora("llama", use_dora=True), **build)
    taken = get_peft_model(make_llama(), _lora("llama"))
    taken.add_adapter("delta_teacher", _lora("llama"))
    with pytest.raises(ValueError, match="already has an adapter named 'delta_teacher'"):
        DeltaTrainer(model=taken, **build)
    with pytest.raises(ValueError, match="Hidden-state indices \\[7\\]"):
        DeltaTrainer(model=make_llama(), peft_config=_lora("llama"), **{**build, "args": delta_config(
            tmp_path, distill_layers=[7])})  # fmt: skip
    with pytest.raises(TypeError, match="DeltaConfig"):
        DeltaTrainer(model=make_llama(), peft_config=_lora("llama"), args=Seq2SeqTrainingArguments(str(tmp_path)))
    with pytest.raises(ValueError, match="predict_with_generate"):
        DeltaTrainer(model=make_llama(), peft_config=_lora("llama"), train_dataset=rows,
                     args=delta_config(tmp_path, delta_mode="linear", predict_with_generate=True))  # fmt: skip


def test_push_to_hub_uploads_the_student_alone(tiny_tokenizer, tmp_path, monkeypatch):
    """Trainer.push_to_hub through a fake Hub API: the uploaded folder is what stock PEFT loads, with no teacher."""
    import fnmatch
    from types import SimpleNamespace

    import transformers.trainer

    uploaded = {}

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            return SimpleNamespace(repo_id=f"user/{repo_id}")

        def upload_folder(self, repo_id, folder_path, ignore_patterns=(), **kwargs):
            for path in sorted(Path(folder_path).rglob("*")):
                relative = str(path.relative_to(folder_path))
                if path.is_file() and not any(fnmatch.fnmatch(relative.split("/")[0], p) for p in ignore_patterns):
                    uploaded[relative] = path.read_bytes()
            return SimpleNamespace(repo_id=repo_id)

    monkeypatch.setattr(transformers.trainer, "hf_api", FakeApi)
    trainer = _trainer("llama", tiny_tokenizer, tmp_path, max_steps=2, save_strategy="steps", save_steps=1)
    trainer.train()
    trainer.push_to_hub()
    assert {"adapter_model.safetensors", "adapter_config.json", "delta_trl.json"} <= uploaded.keys()
    assert not any("teacher" in name or name.startswith("checkpoint-") for name in uploaded)
    (tmp_path / "pulled").mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (tmp_path / "pulled" / name).write_bytes(uploaded[name])
    assert not any("teacher" in k for k in load_file(tmp_path / "pulled" / "adapter_model.safetensors"))
    loaded = PeftModel.from_pretrained(make_llama(), tmp_path / "pulled")
    ids = torch.tensor([[5, 6, 7]])
    trainer.model.eval()
    assert_close(loaded(input_ids=ids).logits, trainer.model(input_ids=ids).logits)


def test_a_peft_model_is_accepted_and_its_adapter_is_the_student(tiny_tokenizer, tmp_path):
    torch.manual_seed(0)
    peft_model = get_peft_model(make_llama(), _lora("llama"), adapter_name="sst2")
    trainer = DeltaTrainer(
        model=peft_model,
        args=delta_config(tmp_path, max_steps=2),
        train_dataset=Dataset.from_list(addition_rows(tiny_tokenizer, n=8)),
        data_collator=DataCollatorForSeq2Seq(tiny_tokenizer, padding=True),
    )
    assert trainer._student_name == "sst2"
    assert set(peft_model.peft_config) == {"sst2", "delta_teacher"}
    trainer.train()
    trainer.save_model()
    saved = load_file(tmp_path / "out" / "sst2" / "adapter_model.safetensors")
    assert saved
    assert not any("teacher" in k for k in saved)
    assert json.loads((tmp_path / "out" / "sst2" / "delta_trl.json").read_text())["adapter_name"] == "sst2"
