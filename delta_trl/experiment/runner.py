"""``delta-trl experiment CONFIG.yaml``: task vectors per method and task, exact merges, α chosen on validation.

For each method (``nonlinear``, ``linear``, ``delta``, ``kd_only``, ``curvature_only``) and each task, one task vector
is trained (``DeltaSFTTrainer`` for causal LMs, ``DeltaTrainer`` for encoder-decoders, ``DeltaDPOTrainer`` for
preference tasks). The task vectors of a method are then merged exactly (θ0 + α·Σ_t τ_t); α is chosen on validation
rows carved from each task's train split (never on test) by the mean normalized score, and every number reported is
measured on test:

- ``zero_shot`` (θ0), ``individual`` (θ0 + τ_t), ``merged_alpha_1`` and ``merged_best`` (θ0 + α*·Σ τ_t), with
  ``normalized = merged score / that method's individual score`` per task, as in the paper;
- ``results.json``, ``results.md``, plots (α sweep per method; disentanglement heat map of the first two tasks;
  for preference tasks the front θ0 + τ_1 + λ·τ_2), and each method's merged adapter in ``merged/<method>`` (a stock
  PEFT adapter with a model card carrying the table).

Resuming: a task vector is reused when ``vectors/<method>/<task>/vector.json`` records the same settings; a killed
training continues from its last checkpoint; an evaluation is reused when its inputs are unchanged. An output folder
whose task vectors were trained with other settings is refused before any work (nothing is deleted).
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from delta_trl._utils import write_json
from delta_trl.errors import UserError, check_lora_targets, check_model_source, model_skeleton, user_errors
from delta_trl.experiment.config import ExperimentConfig, settings_hash
from delta_trl.experiment.tasks import TaskData, load_task, task_spec_from_dict


EXPERIMENT_FILE = "experiment.json"
VECTOR_FILE = "vector.json"
SETTINGS_FILE = "settings.json"
RESULTS_FILE = "results.json"


# ---- the plan: every task vector and its settings, checked before any work -------------------------------------------


@dataclass(frozen=True)
class PreparedTask:
    """A task's rows after the validation split is carved from train."""

    data: TaskData
    train: list[dict[str, str]]
    validation: list[dict[str, str]]
    test: list[dict[str, str]]

    @property
    def name(self) -> str:
        return self.data.name

    def rows_hash(self) -> str:
        return settings_hash({"train": self.train, "validation": self.validation, "test": self.test})


@dataclass(frozen=True)
class VectorPlan:
    method: str
    task: PreparedTask
    folder: Path
    settings: dict[str, Any]

    @property
    def key(self) -> str:
        return settings_hash(self.settings)

    @property
    def done(self) -> bool:
        return _read_json(self.folder / VECTOR_FILE).get("settings_hash") == self.key


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


def split_validation(
    rows: Sequence[dict[str, str]], size: int, seed: int
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """``(train, validation)``: ``min(size, len/5)`` rows drawn with ``seed`` become validation, disjoint by prompt
    (every row of a prompt goes to the same side, so a prompt seen in training is never used to choose α)."""
    prompts = sorted({row["prompt"] for row in rows})
    random.Random(seed).shuffle(prompts)
    wanted = max(1, min(size, len(rows) // 5))
    held: set[str] = set()
    count = 0
    for prompt in prompts:
        if count >= wanted:
            break
        held.add(prompt)
        count += sum(1 for row in rows if row["prompt"] == prompt)
    train = [row for row in rows if row["prompt"] not in held]
    validation = [row for row in rows if row["prompt"] in held]
    if not train or not validation:
        raise UserError(f"Too few training rows ({len(rows)}) to carve a validation split; give at least 5.")
    return train, validation


def prepare_tasks(config: ExperimentConfig, is_encoder_decoder: bool) -> list[PreparedTask]:
    tasks = []
    names = set()
    for entry in config.tasks:
        spec = task_spec_from_dict(entry)
        if spec.name in names:
            raise UserError(f"{config.source}: two tasks are named `{spec.name}`; give each a distinct `name`.")
        names.add(spec.name)
        data = load_task(spec, is_encoder_decoder=is_encoder_decoder, seed=config.seed)
        train, validation = split_validation(data.train, config.evaluation.validation_size, config.seed)
        test = data.test[: config.evaluation.max_test] if config.evaluation.max_test else data.test
        tasks.append(PreparedTask(data, train, validation, list(test)))
    kinds = {task.data.kind for task in tasks}
    if len(kinds) > 1:
        raise UserError(f"{config.source}: mixes completion and preference tasks; run them as two experiments.")
    if "preference" in kinds and is_encoder_decoder:
        raise UserError(f"{config.source}: preference tasks (DPO) need a causal LM; {config.model} is an "
                        "encoder-decoder.")  # fmt: skip
    return tasks


def trainer_kind(task: PreparedTask, is_encoder_decoder: bool) -> str:
    if task.data.kind == "preference":
        return "dpo"
    return "seq2seq" if is_encoder_decoder else "sft"


def config_class(kind: str) -> type:
    from delta_trl.training.configs import DeltaConfig, DeltaDPOConfig, DeltaSFTConfig

    return {"seq2seq": DeltaConfig, "sft": DeltaSFTConfig, "dpo": DeltaDPOConfig}[kind]


def plan_vectors(config: ExperimentConfig, tasks: list[PreparedTask], is_encoder_decoder: bool) -> list[VectorPlan]:
    """One :class:`VectorPlan` per (method, task); refuses training fields the task's trainer config lacks."""
    out = Path(config.output_dir)
    plans = []
    for method in config.methods:
        training = config.training_for(method)
        for task in tasks:
            kind = trainer_kind(task, is_encoder_decoder)
            accepted = {f.name for f in dataclasses.fields(config_class(kind))} | {"max_length"}
            unknown = sorted(set(training) - accepted)
            if unknown:
                raise UserError(f"{config.source}: training field(s) {unknown} do not apply to "
                                f"{config_class(kind).__name__} (task {task.name}, method {method}).")  # fmt: skip
            settings = {
                "model": config.model,
                "dtype": config.dtype,
                "lora": config.lora,
                "training": training,
                "method": method,
                "trainer": kind,
                "seed": config.seed,
                "task": task.name,
                "train_rows": settings_hash({"train": task.train}),
            }
            plans.append(VectorPlan(method, task, out / "vectors" / method / task.name, settings))
    return plans


def _differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def check_output_folder(config: ExperimentConfig, plans: list[VectorPlan]) -> None:
    """Refuse an output folder holding another experiment's task vectors (a clear error, nothing deleted)."""
    out = Path(config.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir {out}: a file, not a folder; choose a folder path.")
    if out.is_dir() and any(out.iterdir()) and not (out / EXPERIMENT_FILE).is_file():
        raise UserError(f"output_dir {out}: a non-empty folder that holds no experiment; choose a new output_dir.")
    for plan in plans:
        recorded = _read_json(plan.folder / SETTINGS_FILE)
        if recorded and recorded != plan.settings:
            changed = ", ".join(_differences(recorded, plan.settings))
            raise UserError(
                f"output_dir {out} holds a different experiment: the task vector {plan.method}/{plan.task.name} was "
                f"trained with other settings ({changed}). Choose a new output_dir; nothing was changed or deleted."
            )


# ---- training ---------------------------------------------------------------------------------------------------------


def _load_model(config: ExperimentConfig, is_encoder_decoder: bool) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from delta_trl.embedded import load_model_and_tokenizer

    with user_errors(f"model {config.model}", also=(ImportError,)):
        return load_model_and_tokenizer(
            config.model,
            model_class=AutoModelForSeq2SeqLM if is_encoder_decoder else AutoModelForCausalLM,
            dtype=getattr(torch, config.dtype),
        )


def _lora_config(config: ExperimentConfig, is_encoder_decoder: bool) -> Any:
    from peft import LoraConfig

    return LoraConfig(task_type="SEQ_2_SEQ_LM" if is_encoder_decoder else "CAUSAL_LM", **config.lora)


def _last_checkpoint(folder: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(folder)) if folder.is_dir() else None


def _seq2seq_dataset(rows: list[dict[str, str]], tokenizer: Any, max_length: int) -> Any:
    from datasets import Dataset

    def encode(row: dict[str, str]) -> dict[str, list[int]]:
        enc = tokenizer(row["prompt"], truncation=True, max_length=max_length)
        enc["labels"] = tokenizer(text_target=row["completion"], truncation=True, max_length=max_length)["input_ids"]
        return dict(enc)

    return Dataset.from_list(rows).map(encode, remove_columns=["prompt", "completion"])


def train_vector(config: ExperimentConfig, plan: VectorPlan, is_encoder_decoder: bool) -> dict[str, Any]:
    """Train (or resume) one task vector into ``plan.folder``; ``vector.json`` is written last, marking it done."""
    from accelerate import PartialState
    from datasets import Dataset

    state = PartialState()
    kind = plan.settings["trainer"]
    training = dict(plan.settings["training"])
    max_length = int(training.pop("max_length", 256)) if kind == "seq2seq" else None
    max_steps = int(training.get("max_steps", -1))
    save_steps = training.pop("save_steps", max(1, max_steps // 4) if max_steps > 0 else 500)
    if state.is_main_process:
        plan.folder.mkdir(parents=True, exist_ok=True)
        write_json(plan.folder / SETTINGS_FILE, plan.settings)
    state.wait_for_everyone()
    args = config_class(kind)(
        **{"disable_tqdm": False, "seed": config.seed, **training},
        output_dir=str(plan.folder),
        delta_mode=plan.method,
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=1,
        report_to="none",
    )
    model, tokenizer = _load_model(config, is_encoder_decoder)
    peft_config = _lora_config(config, is_encoder_decoder)
    if kind == "seq2seq":
        from transformers import DataCollatorForSeq2Seq

        from delta_trl.training.delta_trainer import DeltaTrainer

        trainer = DeltaTrainer(
            model=model,
            args=args,
            train_dataset=_seq2seq_dataset(plan.task.train, tokenizer, max_length or 256),
            data_collator=DataCollatorForSeq2Seq(tokenizer, model=model),
            processing_class=tokenizer,
            peft_config=peft_config,
        )
    elif kind == "sft":
        from delta_trl.training.delta_sft_trainer import DeltaSFTTrainer

        trainer = DeltaSFTTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(plan.task.train),
            processing_class=tokenizer,
            peft_config=peft_config,
        )
    else:
        from delta_trl.training.delta_dpo_trainer import DeltaDPOTrainer

        trainer = DeltaDPOTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(plan.task.train),
            processing_class=tokenizer,
            peft_config=peft_config,
        )
    checkpoint = _last_checkpoint(plan.folder)
    if checkpoint and state.is_main_process:
        print(f"  resuming from {checkpoint}", flush=True)
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model()
    seconds = time.perf_counter() - start
    logs = [h for h in trainer.state.log_history if "loss" in h]
    record = {
        "settings_hash": plan.key,
        "steps": trainer.state.global_step,
        "train_seconds": round(seconds, 1),
        "last_logged": logs[-1] if logs else None,
    }
    if state.is_main_process:
        for old in plan.folder.glob("checkpoint-*"):  # the adapter is saved; checkpoints only served a resume
            shutil.rmtree(old, ignore_errors=True)
        write_json(plan.folder / VECTOR_FILE, record)
    state.wait_for_everyone()
    return record


# ---- evaluation -------------------------------------------------------------------------------------------------------


def eval_set(rows: list[dict[str, str]], task: PreparedTask, is_encoder_decoder: bool) -> Any:
    from delta_trl.evaluation.task_scores import TaskEvalSet

    prompts = [row["prompt"] for row in rows]
    if task.data.kind == "preference":
        return TaskEvalSet("preference", prompts, chosen=[r["chosen"] for r in rows],
                           rejected=[r["rejected"] for r in rows])  # fmt: skip
    answers = [row["completion"] for row in rows]
    if task.data.candidates:
        return TaskEvalSet("closed", prompts, answers, candidates=list(task.data.candidates))
    return TaskEvalSet("open", prompts, answers)


class MethodEvaluation:
    """Scores of one method's task vectors, loaded side by side on one base model (:func:`load_task_adapters`)."""

    def __init__(self, config: ExperimentConfig, method: str, plans: list[VectorPlan], is_encoder_decoder: bool):
        from delta_trl.evaluation.scoring import load_task_adapters

        self.config = config
        self.method = method
        self.tasks = [plan.task for plan in plans]
        from accelerate import PartialState

        base, self.tokenizer = _load_model(config, is_encoder_decoder)
        base.to(PartialState().device)  # the accelerator the run was given (scoring moves each batch to it)
        self.model, self.linearized = load_task_adapters(base, {plan.task.name: plan.folder for plan in plans})
        self.sets = {
            split: {t.name: eval_set(getattr(t, split), t, is_encoder_decoder) for t in self.tasks}
            for split in ("validation", "test")
        }

    def points(self, split: str, task: str, factor_sets: Sequence[Mapping[str, float]]) -> list[dict[str, float]]:
        """One task's scores at several points ``θ0 + Σ α_t τ_t`` (in one pass over its rows where possible)."""
        from delta_trl.evaluation.task_scores import score_task_many

        settings = self.config.evaluation
        return score_task_many(self.model, self.tokenizer, self.sets[split][task], factor_sets,
                               linearized=self.linearized, batch_size=settings.batch_size,
                               max_new_tokens=settings.max_new_tokens, beta=settings.dpo_beta)  # fmt: skip

    def scores(self, factors: Mapping[str, float], split: str) -> dict[str, dict[str, float]]:
        """Every task's scores at one point."""
        return {t.name: self.points(split, t.name, [factors])[0] for t in self.tasks}


def _summary(per_task: Mapping[str, float], individual: Mapping[str, float]) -> dict[str, Any]:
    normalized = {t: (per_task[t] / individual[t] if individual[t] > 0 else None) for t in per_task}
    valid = [v for v in normalized.values() if v is not None]
    return {
        "per_task": dict(per_task),
        "normalized_per_task": normalized,
        "mean_absolute": sum(per_task.values()) / len(per_task),
        "mean_normalized": sum(valid) / len(valid) if valid else None,
    }


def evaluate_method(
    config: ExperimentConfig,
    method: str,
    plans: list[VectorPlan],
    is_encoder_decoder: bool,
    figures: Path,
    with_zero_shot: bool = False,
) -> dict[str, Any]:
    """Individual and merged scores of one method on test, with α chosen on validation (module docstring); with
    ``with_zero_shot``, also θ0's scores (all coefficients 0) under the key ``zero_shot``."""
    from tqdm.auto import tqdm

    from delta_trl.evaluation.diagnostics import alpha_sweep_report
    from delta_trl.evaluation.selection import select_alpha

    def score_only(result: Mapping[str, Any]) -> dict[str, float]:
        return {task: value["score"] for task, value in result.items()}

    ev = MethodEvaluation(config, method, plans, is_encoder_decoder)
    names = [t.name for t in ev.tasks]
    grid = list(dict.fromkeys([*config.evaluation.alphas, 1.0]))  # select_alpha also reports α = 1

    def uniform(alpha: float) -> dict[str, float]:
        return dict.fromkeys(names, alpha)

    # validation: each task's own vector, then the merge at every α of the grid, in one pass per task
    individual_val, sweep = {}, {alpha: {} for alpha in grid}
    for task in tqdm(names, desc=f"{method}: α grid on validation"):
        scored = ev.points("validation", task, [{task: 1.0}] + [uniform(a) for a in grid])
        individual_val[task] = scored[0]["score"]
        for alpha, value in zip(grid, scored[1:], strict=True):
            sweep[alpha][task] = value["score"]
    # the normalisers of α selection must be positive: a task its own vector never gets right counts as one row right
    reference = {t: max(v, 1 / len(ev.sets["validation"][t].prompts)) for t, v in individual_val.items()}
    selection = select_alpha(lambda alpha: sweep[alpha], config.evaluation.alphas, reference)
    alpha_sweep_report(selection, output_dir=figures / method)

    # test: θ0 (once per experiment), each vector alone, the merge at α = 1 and at the α chosen on validation
    test_points = [uniform(1.0), uniform(selection.best_alpha)] + ([{}] if with_zero_shot else [])
    individual_test, merged_one, merged_best, zero = {}, {}, {}, {}
    for task in tqdm(names, desc=f"{method}: test"):
        scored = ev.points("test", task, [{task: 1.0}, *test_points])
        individual_test[task], merged_one[task], merged_best[task] = scored[:3]
        if with_zero_shot:
            zero[task] = scored[3]["score"]
    individual = score_only(individual_test)
    result: dict[str, Any] = {
        "individual": individual,
        "merged_alpha_1": _summary(score_only(merged_one), individual),
        "merged_best": {"alpha": selection.best_alpha, **_summary(score_only(merged_best), individual)},
        "validation": {
            "alphas": selection.alphas,
            "mean_normalized": selection.normalized,
            "individual": individual_val,
        },  # fmt: skip
        "linearized": ev.linearized,
    }
    if ev.tasks[0].data.kind == "preference":
        margins = {"individual": {t: v["mean_margin"] for t, v in individual_test.items()},
                   "merged_alpha_1": {t: v["mean_margin"] for t, v in merged_one.items()},
                   "merged_best": {t: v["mean_margin"] for t, v in merged_best.items()}}  # fmt: skip
        result["mean_margin"] = margins
        if len(names) >= 2:
            result["front"] = preference_front(ev, names[0], names[1], figures / method)
    elif len(names) >= 2 and all(ev.sets["test"][t].kind == "closed" for t in names[:2]):
        result["disentanglement"] = disentanglement(ev, names[0], names[1], figures / method)
    if with_zero_shot:
        result["zero_shot"] = zero
    return result


def disentanglement(ev: MethodEvaluation, first: str, second: str, folder: Path) -> dict[str, Any]:
    """ξ(α1, α2) of the first two tasks on (at most 64) test rows, as a heat map."""
    from delta_trl.evaluation.diagnostics import (
        classification_predictor,
        disentanglement_error,
        disentanglement_points,
    )

    sets = {t: ev.sets["test"][t].classification() for t in (first, second)}
    sets = {t: dataclasses.replace(s, texts=s.texts[:64], labels=s.labels[:64]) for t, s in sets.items()}
    grid = ev.config.evaluation.disentanglement_alphas
    predict = classification_predictor(ev.model, ev.tokenizer, sets, linearized=ev.linearized,
                                       batch_size=ev.config.evaluation.batch_size,
                                       points=disentanglement_points((first, second), grid))  # fmt: skip
    return disentanglement_error(predict, (first, second), grid, output_dir=folder)


def preference_front(ev: MethodEvaluation, first: str, second: str, folder: Path) -> dict[str, Any]:
    """Scores of ``θ0 + τ_first + λ·τ_second`` on both tasks' test pairs as λ varies, written with a plot."""
    from delta_trl.evaluation.diagnostics import coefficient_front

    return coefficient_front(lambda factors: ev.scores(factors, "test"), (first, second),
                             ev.config.evaluation.front_coefficients, output_dir=folder)  # fmt: skip


# ---- reports ----------------------------------------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("delta_trl", "torch", "transformers", "trl", "peft", "accelerate", "datasets"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _fmt(value: Any) -> str:
    return "–" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def results_markdown(results: Mapping[str, Any]) -> str:
    """``results.md``: the summary over methods, then one per-task table per method."""
    tasks = results["tasks"]
    score = "preference accuracy (implicit reward)" if results.get("kind") == "preference" else "accuracy"
    lines = [
        f"# {results.get('name') or 'Experiment'}: {results['model']}",
        "",
        f"Test-split {score}. α* is chosen on validation rows carved from train; normalized = merged score / the "
        "method's individual score, per task, then averaged.",
        "",
        "| method | mean individual | merged α = 1: mean abs. | mean norm. | α* | merged α*: mean abs. | mean norm. |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, r in results["methods"].items():
        mean_ind = sum(r["individual"].values()) / len(r["individual"])
        one, best = r["merged_alpha_1"], r["merged_best"]
        lines.append(f"| {method} | {_fmt(mean_ind)} | {_fmt(one['mean_absolute'])} | {_fmt(one['mean_normalized'])} "
                     f"| {best['alpha']:g} | {_fmt(best['mean_absolute'])} | {_fmt(best['mean_normalized'])} |")  # fmt: skip
    lines += ["", "## Per task", "", "| method | task | zero-shot | individual | merged α = 1 | merged α* |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for method, r in results["methods"].items():
        for task in tasks:
            lines.append(f"| {method} | {task} | {_fmt(results['zero_shot'].get(task))} | "
                         f"{_fmt(r['individual'][task])} | {_fmt(r['merged_alpha_1']['per_task'][task])} | "
                         f"{_fmt(r['merged_best']['per_task'][task])} |")  # fmt: skip
    lines += ["", "Plots: `figures/<method>/alpha_sweep.png`"
              + (", `figures/<method>/coefficient_front.png`" if results.get("kind") == "preference"
                 else ", `figures/<method>/disentanglement_error.png`") + ".", ""]  # fmt: skip
    return "\n".join(lines)


def card_results(results: Mapping[str, Any], method: str) -> dict[str, Any]:
    r = results["methods"][method]
    out: dict[str, Any] = {"training method": method, "tasks": ", ".join(results["tasks"]),
                           "α* (chosen on validation)": r["merged_best"]["alpha"]}  # fmt: skip
    for task in results["tasks"]:
        out[f"{task}: zero-shot / individual / merged α*"] = (
            f"{_fmt(results['zero_shot'].get(task))} / {_fmt(r['individual'][task])} / "
            f"{_fmt(r['merged_best']['per_task'][task])}"
        )
    out["mean normalized score, merged α = 1"] = r["merged_alpha_1"]["mean_normalized"]
    out["mean normalized score, merged α*"] = r["merged_best"]["mean_normalized"]
    return out


def write_merged(config: ExperimentConfig, method: str, plans: list[VectorPlan], results: Mapping[str, Any]) -> Path:
    """``merged/<method>``: θ0 + α*·Σ_t τ_t as one stock PEFT adapter (exact concatenation) with a model card."""
    from delta_trl.hub import model_card
    from delta_trl.merging.merge import merge_adapters

    folder = Path(config.output_dir) / "merged" / method
    alpha = results["methods"][method]["merged_best"]["alpha"]
    adapters = {plan.task.name: str(plan.folder) for plan in plans}
    report = _read_json(folder / "merge_report.json")
    if report.get("coefficients") != [alpha] * len(adapters) or not (folder / "adapter_config.json").is_file():
        merge_adapters(list(adapters.values()), [alpha] * len(adapters), folder, overwrite=True)
    table = card_results(results, method)
    try:
        model_card(folder, repo_id=config.push_to_hub, results=table).save(folder / "README.md")
    except ValueError:  # a base model that is a local folder: no Hub metadata to name, the table alone
        rows = "\n".join(f"| {name} | {_fmt(value)} |" for name, value in table.items())
        text = f"# {folder.name}: θ0 + α*·Σ_t τ_t on {config.model}\n\n| metric | value |\n|---|---|\n{rows}\n"
        (folder / "README.md").write_text(text)
    return folder


# ---- the whole experiment ---------------------------------------------------------------------------------------------


def prepare(config: ExperimentConfig) -> tuple[list[PreparedTask], list[VectorPlan], bool]:
    """Check everything that can be checked before training (model, LoRA targets, tasks, output folder)."""
    check_model_source(config.model, "model")
    skeleton = model_skeleton(config.model, flag="model")
    is_encoder_decoder = bool(getattr(skeleton.config, "is_encoder_decoder", False))
    check_lora_targets(skeleton, config.lora.get("target_modules"), "lora.target_modules")
    with user_errors("lora"):
        _lora_config(config, is_encoder_decoder)
    if config.push_to_hub:
        from delta_trl.hub import card_base_model

        with user_errors("push_to_hub"):  # the card must name the base on the Hub: known before any training
            card_base_model(config.model, "model")
    tasks = prepare_tasks(config, is_encoder_decoder)
    plans = plan_vectors(config, tasks, is_encoder_decoder)
    check_output_folder(config, plans)
    for kind in {p.settings["trainer"] for p in plans}:  # a training value that cannot work fails here, not mid-run
        training = {k: v for k, v in config.training.items() if k != "max_length" or kind != "seq2seq"}
        with user_errors(f"{config.source}: training"):
            config_class(kind)(output_dir=str(Path(config.output_dir) / "check"), report_to="none", **training)
    return tasks, plans, is_encoder_decoder


def run_experiment(config: ExperimentConfig) -> dict[str, Any]:
    """Run (or resume) the experiment; returns what ``results.json`` holds."""
    from accelerate import PartialState

    state = PartialState()
    tasks, plans, is_encoder_decoder = prepare(config)
    out = Path(config.output_dir)
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / EXPERIMENT_FILE, {"config": config.to_dict(), "tasks": [t.name for t in tasks]})
    todo = [plan for plan in plans if not plan.done]
    say = print if state.is_main_process else (lambda *a, **k: None)
    say(f"experiment {config.name or out.name}: {len(config.methods)} method(s) × {len(tasks)} task(s) on "
        f"{config.model}; {len(plans) - len(todo)} task vector(s) reused, {len(todo)} to train", flush=True)  # fmt: skip
    for index, plan in enumerate(todo, 1):
        say(f"[{index}/{len(todo)}] training {plan.method} / {plan.task.name} ({len(plan.task.train)} rows) "
            f"-> {plan.folder}", flush=True)  # fmt: skip
        train_vector(config, plan, is_encoder_decoder)
    results: dict[str, Any] = {}
    if state.is_main_process:
        results = evaluate_all(config, tasks, plans, is_encoder_decoder)
    state.wait_for_everyone()
    return results


def evaluate_all(
    config: ExperimentConfig, tasks: list[PreparedTask], plans: list[VectorPlan], is_encoder_decoder: bool
) -> dict[str, Any]:
    out = Path(config.output_dir)
    figures = out / "figures"
    cache = out / "evaluation"
    methods: dict[str, Any] = {}
    eval_key = settings_hash({"evaluation": dataclasses.asdict(config.evaluation),
                              "rows": {t.name: t.rows_hash() for t in tasks}})  # fmt: skip
    zero_cached = _read_json(cache / "zero_shot.json")
    zero: dict[str, float] | None = zero_cached["scores"] if zero_cached.get("key") == eval_key else None
    for method in config.methods:
        mine = [p for p in plans if p.method == method]
        key = settings_hash({"eval": eval_key, "vectors": [p.key for p in mine]})
        cached = _read_json(cache / f"{method}.json")
        if cached.get("key") == key:
            print(f"{method}: evaluation reused", flush=True)
            methods[method] = cached["result"]
            continue
        print(f"{method}: evaluating {len(mine)} task vector(s) and their merge", flush=True)
        result = evaluate_method(config, method, mine, is_encoder_decoder, figures, with_zero_shot=zero is None)
        if zero is None:
            zero = result.pop("zero_shot")
            write_json(cache / "zero_shot.json", {"key": eval_key, "scores": zero})
        methods[method] = result
        write_json(cache / f"{method}.json", {"key": key, "result": result})
    results = {
        "name": config.name,
        "model": config.model,
        "kind": tasks[0].data.kind,
        "tasks": [t.name for t in tasks],
        "task_sources": {t.name: t.data.source for t in tasks},
        "rows": {t.name: {"train": len(t.train), "validation": len(t.validation), "test": len(t.test)} for t in tasks},
        "zero_shot": zero or {},
        "methods": methods,
        "config": config.to_dict(),
        "versions": _versions(),
    }
    for method in config.methods:
        results["methods"][method]["merged_adapter"] = str(
            write_merged(config, method, [p for p in plans if p.method == method], results)
        )
    write_json(out / RESULTS_FILE, results)
    text = results_markdown(results)
    (out / "results.md").write_text(text)
    print("\n" + text + f"\nresults: {out / RESULTS_FILE}, {out / 'results.md'}; merged adapters: {out / 'merged'}")
    if config.push_to_hub:
        push(config, results)
    return results


def push(config: ExperimentConfig, results: Mapping[str, Any]) -> str:
    """Upload the chosen method's merged adapter (``push_method``, default ``delta`` when trained, else the last)."""
    from delta_trl.errors import published
    from delta_trl.hub import push_to_hub

    assert config.push_to_hub
    method = config.push_method or ("delta" if "delta" in config.methods else config.methods[-1])
    folder = Path(config.output_dir) / "merged" / method
    repo = config.push_to_hub
    retry = f'python -c "from delta_trl.hub import push_to_hub; print(push_to_hub({str(folder)!r}, {repo!r}))"'
    url = published(folder, repo, lambda: push_to_hub(folder, repo, results=card_results(results, method)), retry)
    print(f"  uploaded {folder} to the Hub: {url}")
    return url
