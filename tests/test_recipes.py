"""recipes/sft_delta.py end to end on a tiny local model: importable, configurable, refuses bad input."""

import json

import pytest
from conftest import make_llama, make_tokenizer

from recipes import sft_delta


@pytest.fixture
def tiny_model_dir(tmp_path):
    folder = tmp_path / "tiny"
    make_llama(initializer_range=0.2).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return str(folder)


def _parse(*argv):
    return sft_delta.make_parser().parse_args_and_config(
        ["--config", "recipes/configs/sft_delta.yaml", "--use_cpu", "true", "--disable_tqdm", "true", *argv]
    )


def test_main_trains_saves_and_reports(tiny_model_dir, tmp_path):
    script_args, training_args, model_args = _parse(
        "--model_name_or_path", tiny_model_dir, "--output_dir", str(tmp_path / "out"), "--max_steps", "3",
        "--num_train_examples", "24", "--num_eval_examples", "8", "--distill_weight", "0.5", "--logging_steps", "1",
    )  # fmt: skip
    assert training_args.delta_mode == "delta"
    results = sft_delta.main(script_args, training_args, model_args)
    assert results["steps"] == 3
    assert 0.0 <= results["eval_accuracy_task_vector"] <= 1.0
    assert results["last_logged"]["delta/distill_loss"] >= 0
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["eval_accuracy_base"] == results["eval_accuracy_base"]
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_non_empty_output_dir_is_refused(tiny_model_dir, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep me")
    script_args, training_args, model_args = _parse(
        "--model_name_or_path", tiny_model_dir, "--output_dir", str(tmp_path / "out")
    )
    with pytest.raises(FileExistsError, match="not empty"):
        sft_delta.main(script_args, training_args, model_args)
    assert (tmp_path / "out" / "mine.txt").read_text() == "keep me"


def test_dataset_without_completion_column_is_refused(tiny_model_dir, tmp_path):
    data = tmp_path / "task.jsonl"
    data.write_text('{"prompt": "a", "answer": "b"}\n' * 10)
    script_args, training_args, model_args = _parse(
        "--model_name_or_path", tiny_model_dir, "--output_dir", str(tmp_path / "out"), "--dataset", str(data)
    )
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['completion'\]"):
        sft_delta.main(script_args, training_args, model_args)


def test_builtin_task_is_balanced_and_deterministic():
    data = sft_delta.builtin_sentiment(200, seed=1)
    assert data["completion"] == sft_delta.builtin_sentiment(200, seed=1)["completion"]
    assert 70 < data["completion"].count(" sunny") < 130


def test_dpo_recipe_trains_and_reports(tiny_model_dir, tmp_path):
    from recipes import dpo_delta

    script_args, training_args, model_args = dpo_delta.make_parser().parse_args_and_config(
        ["--config", "recipes/configs/dpo_delta.yaml", "--use_cpu", "true", "--disable_tqdm", "true",
         "--model_name_or_path", tiny_model_dir, "--output_dir", str(tmp_path / "dpo"), "--max_steps", "2",
         "--num_examples", "20", "--dataset", "builtin:verbose", "--logging_steps", "1"]
    )  # fmt: skip
    tokenizer_dir = tmp_path / "tiny"
    (tokenizer_dir / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    results = dpo_delta.main(script_args, training_args, model_args)
    assert results["steps"] == 2
    assert 0.0 <= results["eval_after"]["eval_rewards/accuracies"] <= 1.0
    assert (tmp_path / "dpo" / "adapter_model.safetensors").is_file()
    with pytest.raises(ValueError, match="Unknown built-in preference set"):
        dpo_delta.builtin_preferences("polite", 4, 0)


def test_lora_is_required(tiny_model_dir, tmp_path):
    script_args, training_args, model_args = _parse(
        "--model_name_or_path", tiny_model_dir, "--output_dir", str(tmp_path / "o"), "--use_peft", "false"
    )
    with pytest.raises(ValueError, match="--use_peft"):
        sft_delta.main(script_args, training_args, model_args)
