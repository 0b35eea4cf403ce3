"""The experiment file: one YAML naming the model, LoRA, training settings, methods and tasks (docs/EXPERIMENTS.md).

Every section is checked before any work starts: unknown keys (with the closest known one), training fields that no
trainer config has, methods and presets that do not exist, impossible evaluation settings. A mistake is a
:class:`delta_trl.errors.UserError` naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import json
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from delta_trl.errors import UserError
from delta_trl.training.configs import DELTA_MODES


LORA_KEYS = ("r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "bias", "init_lora_weights")
# The runner owns where and when the trainers write: these training fields are set per task vector.
RUNNER_OWNED = {"output_dir", "overwrite_output_dir", "resume_from_checkpoint", "push_to_hub", "hub_model_id",
                "do_train", "do_eval", "eval_strategy", "save_strategy", "save_total_limit", "report_to",
                "delta_mode"}  # fmt: skip
DEFAULT_ALPHAS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.4)


class _Loader(yaml.SafeLoader):
    """PyYAML follows YAML 1.1, where ``3e-4`` (no dot) is a *string*: a learning rate written that way reached the
    optimizer as text. This loader reads numbers by YAML 1.2's rule, as every other tool a user knows does."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^[-+]?(?:\d[\d_]*\.\d*|\.\d+|\d[\d_]*)(?:[eE][-+]?\d+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"
    ),
    list("-+0123456789."),
)


def _read_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


@dataclass(frozen=True)
class EvaluationSettings:
    """How task vectors and merges are scored and how α is chosen (on validation rows carved from train)."""

    alphas: tuple[float, ...] = DEFAULT_ALPHAS
    validation_size: int = 100
    max_test: int | None = None
    batch_size: int = 16
    max_new_tokens: int = 16
    disentanglement_alphas: tuple[float, ...] = (-2.0, -1.0, 0.0, 1.0, 2.0)
    front_coefficients: tuple[float, ...] = (-1.0, -0.5, 0.0, 0.5, 1.0, 1.5)
    dpo_beta: float = 0.1


@dataclass(frozen=True)
class ExperimentConfig:
    """A parsed, checked experiment file (see the module docstring of :mod:`delta_trl.experiment.runner`)."""

    model: str
    tasks: tuple[dict[str, Any] | str, ...]
    methods: tuple[str, ...] = ("nonlinear", "linear", "delta")
    lora: dict[str, Any] = field(default_factory=lambda: {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0})
    training: dict[str, Any] = field(default_factory=dict)
    method_training: dict[str, dict[str, Any]] = field(default_factory=dict)
    evaluation: EvaluationSettings = field(default_factory=EvaluationSettings)
    seed: int = 0
    dtype: str = "float32"
    output_dir: str = "runs/experiment"
    push_to_hub: str | None = None
    push_method: str | None = None
    name: str | None = None
    source: str | None = None  # the file it was read from, for messages

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("source")
        return data

    def training_for(self, method: str) -> dict[str, Any]:
        """The training fields of one method: the shared ``training`` section, then ``method_training[method]``."""
        return {**self.training, **self.method_training.get(method, {})}


def _closest(key: str, known: Sequence[str]) -> str:
    match = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean `{match[0]}`?)" if match else ""


def _check_keys(section: Mapping[str, Any], known: Sequence[str], where: str) -> None:
    for key in section:
        if key not in known:
            raise UserError(f"{where}: unknown key `{key}`{_closest(key, known)}; known keys: {', '.join(known)}.")


def _as_mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise UserError(f"{where}: expected a mapping of keys to values, got {type(value).__name__}.")
    return dict(value)


def _floats(value: Any, where: str) -> tuple[float, ...]:
    if not isinstance(value, list | tuple) or not value:
        raise UserError(f"{where}: give a non-empty list of numbers, e.g. [0.0, 0.5, 1.0].")
    try:
        numbers = tuple(float(v) for v in value)
    except (TypeError, ValueError) as err:
        raise UserError(f"{where}: every entry must be a number ({err}).") from err
    if any(v != v or abs(v) == float("inf") for v in numbers):
        raise UserError(f"{where}: every entry must be a finite number.")
    return numbers


def parse_evaluation(section: Mapping[str, Any], where: str) -> EvaluationSettings:
    known = [f.name for f in dataclasses.fields(EvaluationSettings)]
    _check_keys(section, known, where)
    values: dict[str, Any] = {}
    for key, value in section.items():
        if key in ("alphas", "disentanglement_alphas", "front_coefficients"):
            values[key] = _floats(value, f"{where}.{key}")
        elif key == "max_test" and value is None:
            values[key] = None
        elif key == "dpo_beta":
            if not isinstance(value, int | float) or value <= 0:
                raise UserError(f"{where}.{key}: give a positive number.")
            values[key] = float(value)
        else:
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"{where}.{key}: give a positive whole number, got {value!r}.")
            values[key] = value
    return EvaluationSettings(**values)


def training_fields() -> set[str]:
    """Every field a trainer config of the runner accepts (seq2seq, SFT and DPO configs together)."""
    from delta_trl.training.configs import DeltaConfig, DeltaDPOConfig, DeltaSFTConfig

    return {f.name for cls in (DeltaConfig, DeltaSFTConfig, DeltaDPOConfig) for f in dataclasses.fields(cls)}


@functools.cache
def _training_field_types() -> dict[str, Any]:
    from delta_trl.training.configs import DeltaConfig, DeltaDPOConfig, DeltaSFTConfig

    types_: dict[str, Any] = {}
    for cls in (DeltaConfig, DeltaSFTConfig, DeltaDPOConfig):
        types_.update(typing.get_type_hints(cls))
    return types_


def _scalar_kinds(annotation: Any) -> set[type]:
    """The scalar types among ``float``, ``int``, ``bool`` and ``str`` a field's annotation admits."""
    args = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else ()
    members = args or (annotation,)
    return {m for m in members if m in (float, int, bool, str)}


def _check_value_type(key: str, value: Any, where: str) -> None:
    """A number field must get a number and a flag a flag: the HF configs do not check, and a learning rate given as
    text would fail only when the optimizer is built, after the model and data are loaded."""
    annotation = _training_field_types().get(key)
    kinds = _scalar_kinds(annotation)
    if value is None or not kinds or str in kinds or isinstance(value, (list, dict)):
        return
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if bool in kinds and isinstance(value, bool):
        return
    if (float in kinds and number) or (int in kinds and isinstance(value, int) and not isinstance(value, bool)):
        return
    wanted = "a number" if float in kinds else "a whole number" if int in kinds else "true or false"
    raise UserError(f"{where}.{key}: give {wanted}, got {value!r}.")


def _check_training(section: Mapping[str, Any], where: str) -> None:
    known = training_fields()
    for key, value in section.items():
        if key in RUNNER_OWNED:
            raise UserError(
                f"{where}: `{key}` is set by the experiment runner for each task vector; remove it "
                "(methods are listed under `methods`, the output folder is `output_dir`)."
            )
        if key not in known:
            raise UserError(
                f"{where}: `{key}` is not a field of DeltaConfig, DeltaSFTConfig or DeltaDPOConfig"
                f"{_closest(key, sorted(known))}."
            )
        _check_value_type(key, value, where)


def parse_config(raw: Mapping[str, Any], source: str = "<experiment>") -> ExperimentConfig:
    """Check a loaded YAML mapping and build the :class:`ExperimentConfig` (raises :class:`UserError`)."""
    if not isinstance(raw, Mapping):
        raise UserError(f"{source}: the experiment file must be a YAML mapping (model:, tasks:, methods: ...).")
    known = [f.name for f in dataclasses.fields(ExperimentConfig) if f.name != "source"]
    _check_keys(raw, known, source)
    for required in ("model", "tasks"):
        if not raw.get(required):
            raise UserError(f"{source}: `{required}` is required.")
    tasks = raw["tasks"]
    if not isinstance(tasks, list) or not tasks:
        raise UserError(f"{source}: `tasks` must be a non-empty list of preset names, folders or task mappings.")
    methods = raw.get("methods", ExperimentConfig.methods)
    if isinstance(methods, str):
        methods = [methods]
    for method in methods:
        if method not in DELTA_MODES:
            raise UserError(f"{source}: unknown method `{method}`{_closest(str(method), DELTA_MODES)}; methods: "
                            f"{', '.join(DELTA_MODES)}.")  # fmt: skip
    if len(set(methods)) != len(methods):
        raise UserError(f"{source}: `methods` lists a method twice: {list(methods)}.")
    lora = _as_mapping(raw.get("lora", {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0}), f"{source}: lora")
    _check_keys(lora, LORA_KEYS, f"{source}: lora")
    training = _as_mapping(raw.get("training"), f"{source}: training")
    _check_training(training, f"{source}: training")
    method_training = _as_mapping(raw.get("method_training"), f"{source}: method_training")
    for method, section in method_training.items():
        # a method not run this time keeps its section (a `--set methods=...` subset); a misspelt one is refused
        if method not in DELTA_MODES:
            raise UserError(f"{source}: method_training.{method}: unknown method `{method}`"
                            f"{_closest(str(method), DELTA_MODES)}; methods: {', '.join(DELTA_MODES)}.")  # fmt: skip
        method_training[method] = _as_mapping(section, f"{source}: method_training.{method}")
        _check_training(method_training[method], f"{source}: method_training.{method}")
    evaluation = parse_evaluation(_as_mapping(raw.get("evaluation"), f"{source}: evaluation"), f"{source}: evaluation")
    push_method = raw.get("push_method")
    if push_method is not None and push_method not in methods:
        raise UserError(f"{source}: push_method `{push_method}` is not one of the methods {list(methods)}.")
    seed = raw.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise UserError(f"{source}: seed must be a whole number, got {seed!r}.")
    dtype = raw.get("dtype", "float32")
    if dtype not in ("float32", "bfloat16", "float16", "float64"):
        raise UserError(f"{source}: dtype must be float32, bfloat16, float16 or float64, got {dtype!r}.")
    return ExperimentConfig(
        model=str(raw["model"]),
        tasks=tuple(tasks),
        methods=tuple(methods),
        lora=lora,
        training=training,
        method_training=method_training,
        evaluation=evaluation,
        seed=seed,
        dtype=dtype,
        output_dir=str(raw.get("output_dir", ExperimentConfig.output_dir)),
        push_to_hub=raw.get("push_to_hub"),
        push_method=push_method,
        name=raw.get("name"),
        source=source,
    )


def set_value(raw: dict[str, Any], assignment: str) -> None:
    """Apply one ``--set a.b.c=value`` override to the raw mapping; the value is parsed as YAML."""
    if "=" not in assignment:
        raise UserError(f"--set {assignment}: write KEY=VALUE, e.g. --set training.max_steps=10.")
    key, text = assignment.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise UserError(f"--set {assignment}: the key {key!r} has an empty part.")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"--set {assignment}: `{part}` is not a section.")
        node = child
    node[parts[-1]] = _read_yaml(text)


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read, override (``--set``) and check an experiment YAML file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such experiment file; see recipes/configs/experiments/ for examples.")
    try:
        raw = _read_yaml(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({' '.join(str(err).split())}).") from err
    raw = dict(raw) if isinstance(raw, Mapping) else raw
    for assignment in overrides:
        set_value(raw, assignment)
    return parse_config(raw, str(path))


def settings_hash(settings: Mapping[str, Any]) -> str:
    """A short stable hash of JSON-able settings (what makes a trained task vector reusable)."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
