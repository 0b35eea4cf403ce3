"""recipes/sft_delta.py and dpo_delta.py end to end on a tiny local model: importable, configurable, refuse bad input,
report the base model's own preference accuracy, push after training."""

import json

import pytest
import torch
from conftest import make_llama, make_tokenizer
from trl.trainer.dpo_trainer import DataCollatorForPreference

from delta_trl.errors import UserError
from delta_trl.evaluation.diagnostics import logp_preference_accuracy
from recipes import dpo_delta, sft_delta


def _parse(*argv):
    return sft_delta.make_parser().parse_args_and_config(
        ["--config", "recipes/configs/sft_delta.yaml", "--use_cpu", "true", "--disable_tqdm", "true", *argv]
    )


def test_main_trains_saves_and_reports(tiny_model_dir, tmp_path):
    script_args, training_args, model_args = _parse(
        "--model_name_or_path", tiny_model_dir, "--output_dir", str(tmp_path / "out"), "--max_steps", "3",
        "--num_train_examples", "24", "--num_eval_examples", "8", "--distill_weight", "0.5", "--logging_steps", "1",
        "--save_eval_split", str(tmp_path / "eval.jsonl"),
    )  # fmt: skip
    assert training_args.delta_mode == "delta"
    results = sft_delta.main(script_args, training_args, model_args)
    assert results["steps"] == 3
    assert results["last_logged"]["delta/distill_loss"] > 0
    assert "mean_token_accuracy" in results["last_logged"]  # TRL's SFTTrainer metric: DeltaSFTTrainer trained it
    # the reported accuracies are those of the base model and of the saved adapter, loaded by stock PEFT
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert len(rows) == 8
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "out").eval()
    held_out = Dataset.from_list(rows)
    assert results["eval_accuracy_task_vector"] == sft_delta.completion_accuracy(
        loaded, tokenizer, held_out, 1.0, False
    )
    assert results["eval_accuracy_base"] == sft_delta.completion_accuracy(loaded, tokenizer, held_out, 0.0, False)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["eval_accuracy_base"] == results["eval_accuracy_base"]
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_non_empty_output_dir_is_refused(tiny_model_dir, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep me")
    script_args, training_args, model_args = _parse(
        "--model_name_or_path", tiny_model_dir, "--output_dir", str(tmp_path / "out")
    )
    with pytest.raises(UserError, match="not empty"):
        sft_delta.main(script_args, training_args, model_args)
    assert (tmp_path / "out" / "mine.txt").read_text() == "keep me"


def test_dataset_without_completion_column_is_refused(tiny_model_dir, tmp_path):
    data = tmp_path / "task.jsonl"
    data.write_text('{"prompt": "a", "answer": "b"}\n' * 10)
    script_args, training_args, model_args = _parse(
        "--model_name_or_path", tiny_model_dir, "--output_dir", str(tmp_path / "out"), "--dataset_name", str(data)
    )
    with pytest.raises(UserError, match=r"task.jsonl:1 lacks the column\(s\) \['completion'\]"):
        sft_delta.main(script_args, training_args, model_args)
    assert not (tmp_path / "out").exists()


def test_hub_dataset_with_trl_script_arguments(tiny_model_dir, tmp_path, monkeypatch):
    """--dataset_name / --dataset_config / --dataset_train_split / --dataset_test_split act as in TRL's scripts: the
    named splits of `load_dataset(name, config)`; the held-out rows are the test split's, extra columns dropped."""
    import datasets

    rows = [{"prompt": f"Review {i}:", "completion": " sunny" if i % 2 else " rainy", "id": i} for i in range(12)]
    calls = []

    def load_dataset(name, config=None, **kwargs):
        calls.append((name, config))
        return datasets.DatasetDict({"dev": datasets.Dataset.from_list(rows[:8]),
                                     "heldout": datasets.Dataset.from_list(rows[8:])})  # fmt: skip

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    args = _parse("--model_name_or_path", tiny_model_dir, "--output_dir", str(tmp_path / "out"), "--max_steps", "1",
                  "--dataset_name", "org/task", "--dataset_config", "small", "--dataset_train_split", "dev",
                  "--dataset_test_split", "heldout", "--save_eval_split", str(tmp_path / "eval.jsonl"))  # fmt: skip
    results = sft_delta.main(*args)
    assert calls == [("org/task", "small")]
    assert results["dataset"] == "org/task"
    saved = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert saved == [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows[8:]]
    with pytest.raises(UserError, match="org/task has no split 'train'; its splits are"):
        sft_delta.main(*_parse("--model_name_or_path", tiny_model_dir, "--output_dir", str(tmp_path / "o2"),
                               "--dataset_name", "org/task"))  # fmt: skip


def test_builtin_task_is_balanced_and_deterministic():
    data = sft_delta.builtin_sentiment(200, seed=1)
    assert data["completion"] == sft_delta.builtin_sentiment(200, seed=1)["completion"]
    assert 70 < data["completion"].count(" sunny") < 130


def _completion_logp(model, ids, start):
    """Σ_{t ≥ start} log p(ids[t] | ids[:t]), written out token by token."""
    logprobs = model(torch.tensor([ids])).logits[0].double().log_softmax(-1)
    return sum(float(logprobs[t - 1, ids[t]]) for t in range(start, len(ids)))


def test_logp_preference_accuracy_against_explicit_sums(tiny_tokenizer):
    """Base model (no adapter): each pair scored by two separate forwards and an explicit sum over its completion."""
    model = make_llama(initializer_range=0.5).eval()
    rows = [("What is 2 + 3?", " 5", " 7 please"), ("the cat", " sleeps", " runs"), ("a man plays", " music", " 9"),
            ("premise:", " entailment", " no"), ("What is 7 + 1?", " 8", " 8!")]  # fmt: skip
    examples = [
        {"prompt_ids": tiny_tokenizer(p).input_ids, "chosen_ids": tiny_tokenizer(c).input_ids,
         "rejected_ids": tiny_tokenizer(r).input_ids}
        for p, c, r in rows
    ]  # fmt: skip
    collator = DataCollatorForPreference(pad_token_id=tiny_tokenizer.pad_token_id)
    batches = [collator(examples[:3]), collator(examples[3:])]
    margins = []
    with torch.no_grad():
        for ex in examples:
            n = len(ex["prompt_ids"])
            chosen = _completion_logp(model, ex["prompt_ids"] + ex["chosen_ids"], n)
            rejected = _completion_logp(model, ex["prompt_ids"] + ex["rejected_ids"], n)
            margins.append(chosen - rejected)
    result = logp_preference_accuracy(model, batches, {})
    assert result["pairs"] == 5
    assert result["accuracy"] == sum(m > 0 for m in margins) / 5
    assert 0 < result["accuracy"] < 1  # this seed gives a mix, so the count is really tested
    assert result["mean_margin"] == pytest.approx(sum(margins) / 5, abs=1e-4)


def _explicit_base_preference(model_dir, rows, adapter=None):
    """The base model's (or ``adapter``'s, loaded by stock PEFT) preference accuracy with TRL's standard-format
    tokenization done by hand: the prompt, and prompt + completion + EOS, tokenized whole; the completion starts
    where both diverge."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).eval()
    wins = 0
    with torch.no_grad():
        for row in rows:
            prompt = tokenizer(row["prompt"]).input_ids
            chosen = tokenizer(row["prompt"] + row["chosen"] + tokenizer.eos_token).input_ids
            rejected = tokenizer(row["prompt"] + row["rejected"] + tokenizer.eos_token).input_ids
            common = [next((i for i, (a, b) in enumerate(zip(prompt, seq, strict=False)) if a != b), min(len(prompt), len(seq)))
                      for seq in (chosen, rejected)]  # fmt: skip
            start = min(common)
            wins += _completion_logp(model, chosen, start) > _completion_logp(model, rejected, start)
    return wins / len(rows)


def test_dpo_recipe_trains_and_reports(tiny_model_dir, tmp_path):
    rows = [{"prompt": f"What is {a} + {b}?", "chosen": f" {a + b}", "rejected": f" {a + b + 1} please"}
            for a in range(4) for b in range(5)]  # fmt: skip
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    script_args, training_args, model_args = dpo_delta.make_parser().parse_args_and_config(
        ["--config", "recipes/configs/dpo_delta.yaml", "--use_cpu", "true", "--disable_tqdm", "true",
         "--model_name_or_path", tiny_model_dir, "--output_dir", str(tmp_path / "dpo"), "--max_steps", "2",
         "--dataset_name", str(data), "--logging_steps", "1", "--learning_rate", "5e-2"]
    )  # fmt: skip
    results = dpo_delta.main(script_args, training_args, model_args)
    assert results["steps"] == 2
    # Before training the policy is the base model: every DPO reward margin is 0, so DPO's accuracy is 0...
    assert results["eval_before"]["eval_rewards/accuracies"] == 0.0
    # ...and the number that means something is the base model's preference by log-probability.
    held_out = dpo_delta.load_preferences(script_args, training_args.seed)["test"]
    assert results["logp_preference_base"]["pairs"] == len(held_out) == 2
    assert results["logp_preference_base"]["accuracy"] == _explicit_base_preference(tiny_model_dir, list(held_out))
    assert results["logp_preference_task_vector"]["accuracy"] == _explicit_base_preference(
        tiny_model_dir, list(held_out), adapter=tmp_path / "dpo"
    )
    assert (tmp_path / "dpo" / "adapter_model.safetensors").is_file()
    saved = json.loads((tmp_path / "dpo" / "results.json").read_text())
    assert saved["logp_preference_base"] == results["logp_preference_base"]


def test_dpo_recipe_builtin_conversational_set(tiny_model_dir, tmp_path):
    script_args, training_args, model_args = dpo_delta.make_parser().parse_args_and_config(
        ["--config", "recipes/configs/dpo_delta.yaml", "--use_cpu", "true", "--disable_tqdm", "true",
         "--model_name_or_path", tiny_model_dir, "--output_dir", str(tmp_path / "dpo"), "--max_steps", "1",
         "--num_examples", "20", "--dataset_name", "builtin:verbose"]
    )  # fmt: skip
    (tmp_path / "tiny" / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    results = dpo_delta.main(script_args, training_args, model_args)
    assert results["logp_preference_base"]["pairs"] == 2
    with pytest.raises(ValueError, match="Unknown built-in preference set"):
        dpo_delta.builtin_preferences("polite", 4, 0)


def test_lora_is_required(tiny_model_dir, tmp_path):
    script_args, training_args, model_args = _parse(
        "--model_name_or_path", tiny_model_dir, "--output_dir", str(tmp_path / "o"), "--use_peft", "false"
    )
    with pytest.raises(UserError, match="--use_peft"):
        sft_delta.main(script_args, training_args, model_args)


def test_first_hour_pipeline_on_the_embedded_name(tmp_path, monkeypatch, capsys):
    """README's first-hour block with `embedded` = a tiny model: train with --save_eval_split, negate with
    `delta-trl merge`, sweep α with `delta-trl evaluate --base-model embedded`; evaluate's accuracy of the task vector
    at α = 1 is the recipe's own held-out accuracy (same rows, same label words)."""
    from fake_embedded import install_fake_embedded

    from delta_trl.cli import main as delta_trl

    monkeypatch.setenv("DELTA_TRL_CACHE", str(tmp_path / "cache"))
    install_fake_embedded(tmp_path / "cache")
    val = tmp_path / "runs" / "sunny-val.jsonl"
    script_args, training_args, model_args = _parse(
        "--model_name_or_path", "embedded", "--output_dir", str(tmp_path / "runs" / "sunny"), "--max_steps", "2",
        "--num_train_examples", "16", "--num_eval_examples", "8", "--save_eval_split", str(val),
    )  # fmt: skip
    results = sft_delta.main(script_args, training_args, model_args)
    rows = [json.loads(line) for line in val.read_text().splitlines()]
    assert len(rows) == 8
    assert set(rows[0]) == {"prompt", "completion"}
    assert (
        delta_trl(["merge", str(tmp_path / "runs" / "sunny"), "-c", "-1", "-o", str(tmp_path / "runs" / "no-sunny")])
        == 0
    )
    code = delta_trl(
        ["evaluate", "--base-model", "embedded", "--adapter", f"sunny={tmp_path / 'runs' / 'sunny'}",
         "--data", f"sunny={val}", "--text-column", "prompt", "--label-column", "completion", "--label-prefix", "",
         "--alphas", "0.5", "1.0", "-o", str(tmp_path / "runs" / "sunny-eval")]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    sweep = json.loads((tmp_path / "runs" / "sunny-eval" / "alpha_sweep.json").read_text())
    assert sweep["reference"]["sunny"] == pytest.approx(results["eval_accuracy_task_vector"])
    assert sweep["per_task"][1]["sunny"] == pytest.approx(results["eval_accuracy_task_vector"])
    with pytest.raises(UserError, match="the file exists"):
        sft_delta.check_args(*_parse("--save_eval_split", str(val)))


def test_a_single_target_module_is_a_name_not_a_regex(tiny_model_dir, tmp_path):
    """TRL turns `--lora_target_modules q_proj` into the string "q_proj", a regex PEFT matches against full names (it
    matches nothing); the recipes read a plain name as a name."""
    args = _parse("--model_name_or_path", tiny_model_dir, "--output_dir", str(tmp_path / "out"), "--max_steps", "1",
                  "--num_train_examples", "8", "--num_eval_examples", "4", "--lora_target_modules", "q_proj")  # fmt: skip
    assert args[2].lora_target_modules == "q_proj"
    sft_delta.main(*args)
    assert args[2].lora_target_modules == ["q_proj"]
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["q_proj"]


def test_conversational_rows_train_with_the_chat_template_and_are_scored_as_trained(tmp_path):
    """`messages` rows: TRL renders them with the chat template; the recipe scores each answer after the templated
    prompt with its generation prompt, as TRL tokenizes it (checked by an explicit sum over the answer's tokens)."""
    from peft import PeftModel
    from test_delta_sft_trainer import CHAT_TEMPLATE
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path / "chat"
    make_llama(initializer_range=0.2).save_pretrained(folder)
    tokenizer = make_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    rows = [{"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                          {"role": "assistant", "content": "even" if (a + b) % 2 == 0 else "odd"}]}
            for a in range(6) for b in range(4)]  # fmt: skip
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    script_args, training_args, model_args = _parse(
        "--model_name_or_path", str(folder), "--output_dir", str(tmp_path / "out"), "--max_steps", "2",
        "--dataset_name", str(data), "--num_eval_examples", "4", "--logging_steps", "1",
    )  # fmt: skip
    results = sft_delta.main(script_args, training_args, model_args)
    assert "mean_token_accuracy" in results["last_logged"]  # trained by (Delta)SFTTrainer on TRL's tokenization
    held_out = sft_delta.load_task(script_args, training_args.seed)["test"]
    assert isinstance(held_out[0]["prompt"], list)

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), tmp_path / "out").eval()
    words = sorted({row["completion"][0]["content"] for row in held_out})
    right = 0
    with torch.no_grad():
        for row in held_out:
            prompt = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True,
                                                   return_dict=True)["input_ids"]  # fmt: skip
            scores = [_completion_logp(model, prompt + tokenizer(w, add_special_tokens=False).input_ids, len(prompt))
                      for w in words]  # fmt: skip
            right += words[max(range(len(words)), key=scores.__getitem__)] == row["completion"][0]["content"]
    assert results["eval_accuracy_task_vector"] == right / len(held_out)
