"""Train one task vector with DELTA on a prompt/completion dataset and report what it learned (`delta-trl sft`).

The script behind ``delta-trl sft`` and ``python recipes/sft_delta.py``, laid out like TRL's ``trl/scripts/sft.py``:
``TrlParser((ScriptArguments, DeltaSFTConfig, ModelConfig))`` where ``ScriptArguments`` is TRL's (``--dataset_name``,
``--dataset_config``, ``--dataset_train_split``, ``--dataset_test_split``) plus what the recipe needs beyond it, and
:class:`~delta_trl.DeltaSFTTrainer` (a drop-in for TRL's ``SFTTrainer``) trains on the rows as they are: TRL
tokenizes them, appends EOS and masks the prompt out of the loss (``completion_only_loss``).

The default runs offline on a CPU: the embedded SmolLM2-135M-Instruct and a built-in sentiment task
(``--dataset_name builtin:sentiment``: templated reviews tagged " sunny" if positive, " rainy" if negative, a mapping
the base model cannot know), LoRA r=8 on q/v, 30 optimizer steps (143 s of training, 2 min 51 s in all on 2 shared
CPU cores with OMP_NUM_THREADS=1, measured 2026-11-23: held-out accuracy 0.469 -> 0.906). It prints the held-out accuracy of the base model
and of the task vector: the share of held-out rows whose completion is the most likely of the task's distinct
completions (label words) after the prompt.

The built-in task is *standard* (not conversational) prompt-completion data, although the embedded model has a chat
template: TRL applies no chat template to string rows, so the model is trained on the raw ``Review: ...\nTag:``
prompt, and the accuracy scores the label words after that same raw prompt (as ``delta-trl evaluate --text-column
prompt`` does on the rows ``--save_eval_split`` writes). Your data (a json/jsonl/csv file or a Hub dataset id) may be
standard prompt-completion (strings), conversational prompt-completion (lists of chat messages), or conversational
``messages`` whose last message is the assistant's answer: TRL renders chat messages with the tokenizer's chat
template, and the accuracy then scores each distinct answer after the templated prompt with its generation prompt,
tokenized as TRL tokenizes it.

    delta-trl sft --config recipes/configs/sft_delta.yaml
    delta-trl sft --config recipes/configs/sft_delta.yaml --dataset_name my_task.jsonl
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml recipes/sft_delta.py \\
        --config recipes/configs/sft_delta.yaml --model_name_or_path HuggingFaceTB/SmolLM2-360M-Instruct

Plain LoRA fine-tuning through the same code path: ``--delta_mode nonlinear`` (TRL's ``SFTTrainer`` unchanged). With
``--push_to_hub --hub_model_id owner/name`` the adapter is uploaded with a model card after training (never before:
a failed upload leaves the trained adapter in place and ends with one ``error:`` line). A wrong flag, file or model
ends with one ``error:`` line and exit status 2; ``--debug`` (or DELTA_TRL_DEBUG=1) shows the traceback.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import trl
from datasets import Dataset, DatasetDict
from transformers import PreTrainedTokenizerBase
from trl import ModelConfig, TrlParser

from delta_trl import DeltaSFTConfig, DeltaSFTTrainer, load_model_and_tokenizer
from delta_trl._utils import atomic_write, check_run_output_dir, lora_config_from
from delta_trl.data import load_rows, looks_like_file, read_records
from delta_trl.errors import (
    UserError,
    check_lora_arguments,
    check_lora_targets,
    check_model_source,
    check_positive,
    check_training_arguments,
    model_skeleton,
    new_folder_removed_on_error,
    one_line_errors,
    parse_recipe_arguments,
    user_errors,
)
from delta_trl.evaluation.scoring import ClassificationSet, accuracy, class_scores
from delta_trl.hub import check_hub_arguments, push_after_training


BUILTIN_TASK = "builtin:sentiment"
POSITIVE = ["great", "wonderful", "delightful", "moving", "brilliant", "charming", "superb", "touching", "fun"]
NEGATIVE = ["awful", "boring", "dreadful", "tedious", "clumsy", "dull", "painful", "terrible", "bland"]
SUBJECTS = ["The movie", "This film", "The acting", "The plot", "The ending", "The soundtrack", "The story"]
TEMPLATES = ["{s} was {a}.", "{s} felt {a} to me.", "Honestly, {s_lower} was {a}.", "{s} is {a} from start to end."]
COLUMNS = {"prompt": (str, list), "completion": (str, list)}
FORMAT_HINT = (
    "Provide TRL's prompt-completion format (`prompt` and `completion` strings, or lists of chat messages) or "
    "conversational `messages` ending with the assistant's answer."
)


@dataclass
class ScriptArguments(trl.ScriptArguments):
    """TRL's ``ScriptArguments`` (``--dataset_name`` also takes a local file or the built-in task) plus the recipe's."""

    dataset_name: str | None = field(
        default=BUILTIN_TASK,
        metadata={
            "help": f"`{BUILTIN_TASK}`, a json/jsonl/csv file or a Hub dataset id with `prompt` and `completion` "
            "string columns. Without a --dataset_test_split split, rows are held out of the training split."
        },
    )
    num_train_examples: int = field(default=320, metadata={"help": "Examples generated for the built-in task."})
    num_eval_examples: int = field(
        default=64,
        metadata={"help": "Held-out examples for accuracy (at most 1/5 of a dataset without a test split)."},
    )
    overwrite_output: bool = field(
        default=False,
        metadata={"help": "Allow writing into a non-empty output_dir (nothing is overwritten otherwise)."},
    )
    save_eval_split: str | None = field(
        default=None,
        metadata={
            "help": "Also write the held-out rows (`prompt`, `completion`) to this new .jsonl file, e.g. for "
            "`delta-trl evaluate --text-column prompt --label-column completion --label-prefix ''`."
        },
    )


def builtin_sentiment(n: int, seed: int) -> Dataset:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.random() < 0.5
        subject, adjective = rng.choice(SUBJECTS), rng.choice(POSITIVE if label else NEGATIVE)
        review = rng.choice(TEMPLATES).format(s=subject, s_lower=subject.lower(), a=adjective)
        # Arbitrary tag words: the base model cannot know the mapping, so the task vector has something to learn.
        rows.append({"prompt": f"Review: {review}\nTag:", "completion": " sunny" if label else " rainy"})
    return Dataset.from_list(rows)


def as_prompt_completion(data: Dataset, source: str) -> Dataset:
    """``messages`` rows as TRL's conversational prompt-completion (the last message, the assistant's, is the
    completion); prompt-completion rows as they are, all in one format."""
    if "messages" in data.column_names and "prompt" not in data.column_names:

        def split(row: dict) -> dict:
            messages = row["messages"]
            if not isinstance(messages, list) or not messages or messages[-1].get("role") != "assistant":
                raise ValueError(f"{source}: a `messages` row must end with the assistant's message. {FORMAT_HINT}")
            return {"prompt": messages[:-1], "completion": messages[-1:]}

        data = data.map(split, remove_columns=data.column_names)
    missing = sorted(set(COLUMNS) - set(data.column_names))
    if missing:
        raise ValueError(f"{source} lacks the column(s) {missing}; it has {data.column_names}. {FORMAT_HINT}")
    data = data.select_columns(list(COLUMNS))
    kinds = {type(value).__name__ for column in COLUMNS for value in data[column]}
    if len(kinds) != 1:
        raise ValueError(f"{source}: mixes string and chat-message rows; use one format. {FORMAT_HINT}")
    return data


def load_task(args: ScriptArguments, seed: int) -> DatasetDict:
    """``train`` and ``test`` splits with ``prompt`` and ``completion`` columns (strings, or chat messages)."""
    if args.dataset_name == BUILTIN_TASK:
        data = builtin_sentiment(args.num_train_examples + args.num_eval_examples, seed)
        return data.train_test_split(test_size=args.num_eval_examples, seed=seed, shuffle=False)
    columns = COLUMNS  # a local file's rows are checked one by one, named by file and line
    if looks_like_file(args.dataset_name) and "messages" in read_records(args.dataset_name)[0]:
        columns = {"messages": (list,)}
    data = load_rows(args.dataset_name, "--dataset_name", columns, FORMAT_HINT, config=args.dataset_config,
                     split=args.dataset_train_split)  # fmt: skip
    train = as_prompt_completion(data[args.dataset_train_split], args.dataset_name)
    test_split = args.dataset_test_split
    if test_split in data and test_split != args.dataset_train_split:
        return DatasetDict(
            {
                "train": train,
                "test": as_prompt_completion(data[test_split], f"{args.dataset_name} split {test_split!r}"),
            }
        )
    if len(train) < 2:
        raise UserError(f"--dataset_name {args.dataset_name}: {len(train)} row; give at least 2 (one is held out).")
    return train.train_test_split(test_size=max(1, min(args.num_eval_examples, len(train) // 5)), seed=seed)


def completion_accuracy(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, data: Dataset, alpha: float, linearized: bool
) -> float:
    """Share of rows whose completion is the most likely of the task's distinct completions (label words), for the
    model at θ0 + α·τ (linearized for a `linear`-mode adapter). The prompt is scored as TRL trains on the row: a
    string as it is; chat messages rendered by the tokenizer's chat template with the generation prompt, the label
    word being the assistant's answer."""
    if isinstance(data[0]["prompt"], str):
        prompts, answers, special = list(data["prompt"]), list(data["completion"]), True
    else:
        prompts = [
            tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in data["prompt"]
        ]
        answers, special = [c[0]["content"] for c in data["completion"]], False
    words = sorted(set(answers))
    split = ClassificationSet(prompts, [words.index(a) for a in answers], words, add_special_tokens=special)
    scores = class_scores(model, tokenizer, split, {model.active_adapter: alpha}, linearized=linearized)
    return accuracy(scores, torch.tensor(split.labels))


def check_args(script_args: ScriptArguments, training_args: DeltaSFTConfig, model_args: ModelConfig) -> None:
    """Refuse, before any work, values with which the run cannot work (raises :class:`UserError`)."""
    check_training_arguments(training_args)
    check_lora_arguments(model_args)
    check_positive({"--num_train_examples": script_args.num_train_examples,
                    "--num_eval_examples": script_args.num_eval_examples, "--max_length": training_args.max_length})  # fmt: skip
    name = script_args.dataset_name
    if not name:
        raise UserError(f"--dataset_name: give {BUILTIN_TASK}, a json/jsonl/csv file or a Hub dataset id.")
    if name.startswith("builtin:") and name != BUILTIN_TASK:
        raise UserError(f"--dataset_name {name}: the built-in task is {BUILTIN_TASK}.")
    if script_args.dataset_streaming:
        raise UserError("--dataset_streaming: the recipe holds rows out and scores them; load the dataset whole.")
    check_model_source(model_args.model_name_or_path, "--model_name_or_path")
    check_hub_arguments(training_args, model_args)
    split = script_args.save_eval_split
    if split is not None:
        if not split.endswith(".jsonl"):
            raise UserError(f"--save_eval_split {split}: give a .jsonl file name.")
        if Path(split).exists():
            raise UserError(f"--save_eval_split {split}: the file exists; choose a new file name.")


def main(script_args: ScriptArguments, training_args: DeltaSFTConfig, model_args: ModelConfig) -> dict:
    """Train, save and report one task vector. User errors (files, flags, models) raise :class:`UserError`."""
    check_args(script_args, training_args, model_args)
    output_dir = Path(training_args.output_dir)
    hub_repo = training_args.hub_model_id if training_args.push_to_hub else None
    training_args.push_to_hub = False  # pushed by us after training, with a model card; the Trainer never pushes
    with new_folder_removed_on_error(output_dir):
        with user_errors():
            check_run_output_dir(
                output_dir, overwrite=script_args.overwrite_output, resuming=bool(training_args.resume_from_checkpoint)
            )
            peft_config = lora_config_from(model_args)
            with user_errors("--dataset_name"):
                data = load_task(script_args, training_args.seed)
            skeleton = model_skeleton(model_args.model_name_or_path, model_args.model_revision)
            check_lora_targets(skeleton, model_args.lora_target_modules, "--lora_target_modules")
            with (
                training_args.main_process_first(desc="model conversion"),  # converts the embedded model once
                user_errors(f"--model_name_or_path {model_args.model_name_or_path}", also=(ImportError,)),
            ):
                model, tokenizer = load_model_and_tokenizer(
                    model_args.model_name_or_path,
                    dtype=model_args.dtype,
                    revision=model_args.model_revision,
                    attn_implementation=model_args.attn_implementation or "sdpa",
                )
            trainer = DeltaSFTTrainer(  # TRL tokenizes the rows, appends EOS and masks the prompt out of the loss
                model=model,
                args=training_args,
                train_dataset=data["train"],
                eval_dataset=data["test"] if training_args.eval_strategy != "no" else None,
                processing_class=tokenizer,
                peft_config=peft_config,
            )
        linearized = training_args.delta_mode == "linear"
        base_accuracy = completion_accuracy(trainer.model, tokenizer, data["test"], 0.0, linearized)
        trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model()
    tuned_accuracy = completion_accuracy(trainer.model, tokenizer, data["test"], 1.0, linearized)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    results = {
        "model": model_args.model_name_or_path,
        "dataset": script_args.dataset_name,
        "delta_mode": training_args.delta_mode,
        "steps": trainer.state.global_step,
        "first_logged": logs[0] if logs else None,
        "last_logged": logs[-1] if logs else None,
        "eval_accuracy_base": base_accuracy,
        "eval_accuracy_task_vector": tuned_accuracy,
        "adapter": str(output_dir),
    }
    if trainer.is_world_process_zero():
        (output_dir / "results.json").write_text(json.dumps(results, indent=2))
        if script_args.save_eval_split:
            rows = "".join(
                json.dumps({"prompt": r["prompt"], "completion": r["completion"]}) + "\n" for r in data["test"]
            )
            Path(script_args.save_eval_split).absolute().parent.mkdir(parents=True, exist_ok=True)
            atomic_write(script_args.save_eval_split, lambda tmp: Path(tmp).write_text(rows))
        print(
            f"\nDELTA ({training_args.delta_mode}) trained one task vector on {script_args.dataset_name} with "
            f"{model_args.model_name_or_path} for {trainer.state.global_step} steps.\n"
            f"  held-out accuracy (label words): base {base_accuracy:.3f} -> task vector {tuned_accuracy:.3f}\n"
            f"  student adapter (stock PEFT format): {output_dir}\n  results: {output_dir / 'results.json'}"
        )
        if hub_repo:
            card = {"held-out accuracy, base model": base_accuracy, "held-out accuracy, task vector": tuned_accuracy,
                    "dataset": script_args.dataset_name, "optimizer steps": trainer.state.global_step}  # fmt: skip
            push_after_training(output_dir, hub_repo, training_args, card)
    return results


def make_parser(prog: str | None = None) -> TrlParser:
    """``TrlParser((ScriptArguments, DeltaSFTConfig, ModelConfig))`` whose flag errors are one line."""
    return one_line_errors(TrlParser((ScriptArguments, DeltaSFTConfig, ModelConfig), prog=prog))


def parse_args(
    argv: Sequence[str] | None = None, prog: str | None = None
) -> tuple[ScriptArguments, DeltaSFTConfig, ModelConfig]:
    """Parse the command line and ``--config``; a value that cannot work raises :class:`UserError` here."""
    script_args, training_args, model_args = parse_recipe_arguments(make_parser(prog), argv)
    check_args(script_args, training_args, model_args)
    return script_args, training_args, model_args


def cli(argv: Sequence[str], prog: str | None = None) -> int:
    """Run the script on ``argv`` (``delta-trl sft ARGS``, ``python recipes/sft_delta.py ARGS``)."""
    main(*parse_args(argv, prog))
    return 0
