"""The tasks an experiment trains task vectors on: presets for public datasets, built-in offline tasks, local data.

An experiment names its tasks in YAML; :func:`task_spec_from_dict` turns one entry into a :class:`TaskSpec` and
:func:`load_task` turns that into a :class:`TaskData`: ``train`` and ``test`` rows of plain strings, ready for
``DeltaSFTTrainer`` (``prompt``/``completion``) or ``DeltaDPOTrainer`` (``prompt``/``chosen``/``rejected``).

A task comes from one of:

- a **preset** (:data:`PRESETS`): NLI datasets (SNLI, MNLI, SICK, SciTail, RTE, QNLI) formatted as text-to-text for an
  encoder-decoder (``premise: ... hypothesis: ...`` → ``entailment``) or as a tagging prompt for a causal LM, and
  preference datasets (HelpSteer2 by helpfulness or by verbosity, UltraFeedback). A preset loads from the Hub, or
  with ``path`` from a local copy of the same data (one ``SPLIT.jsonl``/``.json``/``.csv``/``.parquet`` per split, or
  a ``save_to_disk`` folder), which is how a machine without internet runs it;
- a **built-in** task generated in process (``builtin:sentiment``, ``builtin:objects``, ``builtin:helpful``,
  ``builtin:verbose``), for offline smoke runs on the embedded model;
- a local folder with ``train.jsonl``/``test.jsonl`` or a single data file (a fifth of it held out), or a Hub id with
  a ``columns`` mapping.

Every mistake in a task entry or its data is a :class:`~delta_trl.errors.UserError` that names the task, the file or
column, and what to do, raised before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import os
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from delta_trl.errors import UserError, one_line


COMPLETION = "completion"
PREFERENCE = "preference"
COMPLETION_COLUMNS = ("prompt", "completion")
PREFERENCE_COLUMNS = ("prompt", "chosen", "rejected")
SPLIT_FILE_TYPES = (".jsonl", ".json", ".csv", ".parquet")
MAX_CANDIDATES = 20
BUILTIN_TRAIN, BUILTIN_TEST = 320, 80
HOLDOUT_SHARE, HOLDOUT_MAX = 0.2, 200

# The objects task of bench/task_addition.py: objects tagged " meadow" (animal) or " highway" (vehicle), a mapping a
# base model cannot know, so its task vector has something to learn.
ANIMALS = ["cat", "dog", "horse", "cow", "sheep", "rabbit", "fox", "goat", "duck", "mouse", "wolf", "deer"]
VEHICLES = [
    "car",
    "truck",
    "bus",
    "bicycle",
    "train",
    "tractor",
    "van",
    "motorbike",
    "taxi",
    "scooter",
    "tram",
    "lorry",
]
OBJECT_TEMPLATES = [
    "Item: a {x}.\nTag:",
    "I saw a {x} today.\nTag:",
    "There is a {x} outside.\nTag:",
    "Picture of a {x}.\nTag:",
]

Row = dict[str, str]
RawRow = dict[str, Any]


# ---- public types -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskData:
    """One task's rows, all strings.

    Attributes:
        name: the task's name in the experiment.
        kind: ``"completion"`` (rows ``prompt``/``completion``) or ``"preference"`` (``prompt``/``chosen``/
            ``rejected``).
        train, test: the rows; ``test`` holds labelled rows only.
        candidates: for a completion task whose completions form a small closed set (at most ``max_candidates``
            distinct train completions, every test completion among them), that set sorted: the task is scored by
            ranking the candidates. ``None`` otherwise (scored by greedy decoding and exact match), and always
            ``None`` for a preference task.
        source: where the rows came from, for logs and reports.
    """

    name: str
    kind: str
    train: list[Row]
    test: list[Row]
    candidates: list[str] | None
    source: str


@dataclass(frozen=True)
class TaskSpec:
    """One task entry of an experiment (see :func:`task_spec_from_dict` for the YAML form).

    Attributes:
        name: the task's name in the experiment.
        preset: a name in :data:`PRESETS`, or ``None``.
        path: a local folder or file; with ``preset``, a local copy of that preset's Hub data (same columns and
            split names).
        hub_id, hub_config: a Hub dataset (no preset), read through ``columns``.
        train_split, test_split: split names; with a preset, the defaults (``train``/``test``) stand for the preset's
            own splits (MNLI's test is ``validation_matched``), and another name replaces them.
        columns: our column names (``prompt``/``completion`` or ``prompt``/``chosen``/``rejected``) → the source's.
        max_train, max_test: keep the first N rows after a seeded shuffle (deterministic); for a built-in task, the
            number of rows generated.
    """

    name: str
    preset: str | None = None
    path: str | None = None
    hub_id: str | None = None
    hub_config: str | None = None
    train_split: str = "train"
    test_split: str = "test"
    columns: dict[str, str] | None = None
    max_train: int | None = None
    max_test: int | None = None


# Converts one split's source rows into our rows: (task name, rows, where they come from, is_encoder_decoder).
Converter = Callable[[str, list[RawRow], str, bool], list[Row]]
# Generates a built-in task: (n_train, n_test, seed, is_encoder_decoder) -> (train, test).
Builder = Callable[[int, int, int, bool], tuple[list[Row], list[Row]]]


@dataclass(frozen=True)
class Preset:
    """A named task: a Hub dataset with its splits and a converter, or a built-in generator (``build``)."""

    name: str
    kind: str
    description: str
    hub_id: str | None = None
    config: str | None = None
    revision: str | None = None
    train_split: str = "train"
    test_split: str = "test"
    columns: tuple[str, ...] = ()  # the source columns the converter reads
    convert: Converter | None = None
    build: Builder | None = None

    def load_hint(self) -> str:
        """The ``datasets`` call that downloads this preset's data (for the offline message)."""
        args = [repr(self.hub_id)] + ([repr(self.config)] if self.config else [])
        args += [f"revision={self.revision!r}"] if self.revision else []
        return f"datasets.load_dataset({', '.join(args)})"


# ---- NLI presets ------------------------------------------------------------------------------------------------

ENTAILMENT, NEUTRAL, CONTRADICTION, NOT_ENTAILMENT = "entailment", "neutral", "contradiction", "not_entailment"
THREE_WAY = {0: ENTAILMENT, 1: NEUTRAL, 2: CONTRADICTION}
TWO_WAY = {0: ENTAILMENT, 1: NOT_ENTAILMENT}
# What unlabelled rows carry: SNLI's -1 (no annotator consensus), GLUE's hidden test labels (-1), SNLI-format's "-".
UNLABELLED = (None, -1, "-1", "", "-")


def format_nli(premise: str, hypothesis: str, label: str, *, is_encoder_decoder: bool) -> Row:
    """An NLI pair as a prompt/completion row: T5's text-to-text form, or a tagging prompt for a causal LM."""
    if is_encoder_decoder:
        return {"prompt": f"premise: {premise} hypothesis: {hypothesis}", "completion": label}
    # The leading space makes the label one word after "Relation:" as a causal LM's tokenizer splits running text.
    return {"prompt": f"Premise: {premise}\nHypothesis: {hypothesis}\nRelation:", "completion": f" {label}"}


def _label_word(task: str, value: Any, labels: Mapping[int | str, str], where: str) -> str | None:
    """The label word of ``value`` (an id, an id written as text in a CSV, or a name); ``None`` if unlabelled."""
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)  # a CSV copy holds the ids as text
    if isinstance(value, float):  # a Parquet copy whose label column went through pandas (NaN for a missing label)
        value = None if value != value else int(value) if value.is_integer() else value
    if value in UNLABELLED or (isinstance(value, str) and value.strip() in UNLABELLED):
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value in labels:
        return labels[value]
    names = {str(key).lower(): word for key, word in labels.items() if isinstance(key, str)}
    names.update({word: word for word in labels.values()})  # a copy that already holds the label words
    if isinstance(value, str) and value.strip().lower() in names:
        return names[value.strip().lower()]
    known = ", ".join(f"{k!r}" for k in labels)
    raise UserError(
        f"task {task}: {where} has the label {value!r}, which is none of {known} (or -1 for unlabelled); "
        "fix the label column or choose the preset that matches the data."
    )


def nli_converter(premise: str, hypothesis: str, label: str, labels: Mapping[int | str, str]) -> Converter:
    """A converter reading the source columns ``premise``, ``hypothesis`` and ``label``; unlabelled rows dropped."""

    def convert(task: str, rows: list[RawRow], where: str, is_encoder_decoder: bool) -> list[Row]:
        out = []
        for i, row in enumerate(rows):
            word = _label_word(task, row[label], labels, f"{where}, row {i}")
            if word is None:
                continue
            p, h = (
                _string(task, row, premise, f"{where}, row {i}"),
                _string(task, row, hypothesis, f"{where}, row {i}"),
            )
            out.append(format_nli(p, h, word, is_encoder_decoder=is_encoder_decoder))
        return out

    return convert


# ---- preference presets -----------------------------------------------------------------------------------------


def _score(task: str, value: Any, column: str, where: str) -> float | None:
    """A HelpSteer2 attribute score as a number (CSV copies hold text); ``None`` if missing."""
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise UserError(
            f"task {task}: {where}: `{column}` is {value!r}, not a score; HelpSteer2's attributes are numbers 0-4."
        ) from None


def pairs_by_attribute(
    task: str, rows: list[RawRow], attribute: str, where: str, *, prompt: str = "prompt", response: str = "response"
) -> list[Row]:
    """Preference pairs from responses rated on ``attribute`` (HelpSteer2's form: one row per prompt and response).

    Rows are grouped by prompt (in order of first appearance); every two responses to one prompt whose scores
    differ make a pair, the higher-scored one chosen, in the order the responses appear: deterministic. Responses
    with no score, and pairs of identical responses (no preference to learn), are skipped.
    """
    groups: dict[str, list[tuple[str, float]]] = {}
    for i, row in enumerate(rows):
        at = f"{where}, row {i}"
        score = _score(task, row[attribute], attribute, at)
        if score is not None:
            groups.setdefault(_string(task, row, prompt, at), []).append((_string(task, row, response, at), score))
    pairs = []
    for text, responses in groups.items():
        for i, (first, first_score) in enumerate(responses):
            for second, second_score in responses[i + 1 :]:
                if first_score == second_score or first == second:
                    continue
                chosen, rejected = (first, second) if first_score > second_score else (second, first)
                pairs.append({"prompt": text, "chosen": chosen, "rejected": rejected})
    return pairs


def helpsteer2_converter(attribute: str) -> Converter:
    """HelpSteer2 rows → pairs preferring the higher ``attribute``; raw strings for either architecture (the DPO
    trainer applies no chat template to plain strings)."""

    def convert(task: str, rows: list[RawRow], where: str, is_encoder_decoder: bool) -> list[Row]:
        return pairs_by_attribute(task, rows, attribute, where)

    return convert


def last_assistant_message(task: str, value: Any, column: str, where: str) -> str:
    """The content of the last assistant message of a chat (UltraFeedback's ``chosen``/``rejected``); a string as is."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        for message in reversed(value):
            if isinstance(message, dict) and message.get("role") == "assistant":
                if isinstance(message.get("content"), str):
                    return message["content"]
                break
    raise UserError(
        f"task {task}: {where}: `{column}` holds no assistant message with string content; UltraFeedback's "
        '`chosen`/`rejected` are lists of {"role", "content"} messages ending with the assistant\'s answer.'
    )


def ultrafeedback_converter(task: str, rows: list[RawRow], where: str, is_encoder_decoder: bool) -> list[Row]:
    """UltraFeedback-binarized rows → prompt / chosen answer / rejected answer strings (ties skipped)."""
    out = []
    for i, row in enumerate(rows):
        at = f"{where}, row {i}"
        chosen = last_assistant_message(task, row["chosen"], "chosen", at)
        rejected = last_assistant_message(task, row["rejected"], "rejected", at)
        if chosen != rejected:
            out.append({"prompt": _string(task, row, "prompt", at), "chosen": chosen, "rejected": rejected})
    return out


# ---- built-in tasks ---------------------------------------------------------------------------------------------


def builtin_objects(n: int, seed: int) -> list[Row]:
    """``n`` rows of the objects task: a templated mention of an animal (→ `` meadow``) or a vehicle (→ `` highway``)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        animal = rng.random() < 0.5
        prompt = rng.choice(OBJECT_TEMPLATES).format(x=rng.choice(ANIMALS if animal else VEHICLES))
        rows.append({"prompt": prompt, "completion": " meadow" if animal else " highway"})
    return rows


def _split_generated(rows: list[Row], n_train: int, is_encoder_decoder: bool) -> tuple[list[Row], list[Row]]:
    if is_encoder_decoder:  # T5 starts its target without a space: the label word alone
        rows = [{**row, "completion": row["completion"].lstrip()} for row in rows]
    return rows[:n_train], rows[n_train:]


def _build_sentiment(n_train: int, n_test: int, seed: int, is_encoder_decoder: bool) -> tuple[list[Row], list[Row]]:
    from delta_trl.scripts.sft import builtin_sentiment  # imports TRL: only when this task is asked for

    return _split_generated(list(builtin_sentiment(n_train + n_test, seed)), n_train, is_encoder_decoder)


def _build_objects(n_train: int, n_test: int, seed: int, is_encoder_decoder: bool) -> tuple[list[Row], list[Row]]:
    return _split_generated(builtin_objects(n_train + n_test, seed), n_train, is_encoder_decoder)


def _preference_builder(kind: str) -> Builder:
    """The DPO recipe's built-in set ``kind`` as string rows (its conversational rows hold one message each)."""

    def build(n_train: int, n_test: int, seed: int, is_encoder_decoder: bool) -> tuple[list[Row], list[Row]]:
        from delta_trl.scripts.dpo import builtin_preferences

        rows = [
            {"prompt": r["prompt"][-1]["content"], "chosen": r["chosen"][-1]["content"],
             "rejected": r["rejected"][-1]["content"]}
            for r in builtin_preferences(kind, n_train + n_test, seed)
        ]  # fmt: skip
        return rows[:n_train], rows[n_train:]

    return build


# ---- the registry -----------------------------------------------------------------------------------------------


def _presets(*presets: Preset) -> dict[str, Preset]:
    return {preset.name: preset for preset in presets}


PRESETS: dict[str, Preset] = _presets(
    Preset("snli", COMPLETION, "SNLI: 3-way NLI on image captions (stanfordnlp/snli, train / test)",
           hub_id="stanfordnlp/snli", columns=("premise", "hypothesis", "label"),
           convert=nli_converter("premise", "hypothesis", "label", THREE_WAY)),
    # MNLI's test labels are hidden: the matched validation split is the test.
    Preset("mnli", COMPLETION, "MultiNLI: 3-way NLI over genres (nyu-mll/multi_nli, train / validation_matched)",
           hub_id="nyu-mll/multi_nli", test_split="validation_matched", columns=("premise", "hypothesis", "label"),
           convert=nli_converter("premise", "hypothesis", "label", THREE_WAY)),
    # SICK: the canonical `sick` dataset moved to RobZamp/sick (the id the old `load_dataset("sick")` redirects to;
    # sentence_A / sentence_B / label 0 entailment 1 neutral 2 contradiction; train / validation / test). Its Hub repo
    # is a loading script, which `datasets` >= 4 refuses, so the preset reads the Hub's Parquet export of it
    # (revision refs/convert/parquet: same columns, ClassLabel ids). Label names are accepted too ("ENTAILMENT").
    Preset("sick", COMPLETION, "SICK: 3-way NLI on compositional sentences (RobZamp/sick, train / test)",
           hub_id="RobZamp/sick", revision="refs/convert/parquet", columns=("sentence_A", "sentence_B", "label"),
           convert=nli_converter("sentence_A", "sentence_B", "label",
                                 {**THREE_WAY, "entailment": ENTAILMENT, "neutral": NEUTRAL,
                                  "contradiction": CONTRADICTION})),
    # SciTail's tsv_format has plain premise / hypothesis / label columns with the label as text ("entails" or
    # "neutral"); the snli_format config has sentence1 / sentence2 / gold_label plus parses.
    Preset("scitail", COMPLETION, "SciTail: 2-way science entailment (allenai/scitail tsv_format, train / test)",
           hub_id="allenai/scitail", config="tsv_format", columns=("premise", "hypothesis", "label"),
           convert=nli_converter("premise", "hypothesis", "label", {"entails": ENTAILMENT, "neutral": NEUTRAL})),
    # GLUE's test labels are hidden (-1): the validation split is the test.
    Preset("rte", COMPLETION, "RTE: 2-way entailment (nyu-mll/glue rte, train / validation)",
           hub_id="nyu-mll/glue", config="rte", test_split="validation", columns=("sentence1", "sentence2", "label"),
           convert=nli_converter("sentence1", "sentence2", "label", TWO_WAY)),
    # QNLI asks whether `sentence` answers `question`: the sentence is the evidence (premise), the question the
    # claim checked against it (hypothesis).
    Preset("qnli", COMPLETION, "QNLI: does the sentence answer the question (nyu-mll/glue qnli, train / validation)",
           hub_id="nyu-mll/glue", config="qnli", test_split="validation", columns=("question", "sentence", "label"),
           convert=nli_converter("sentence", "question", "label", TWO_WAY)),
    Preset("helpsteer2_helpfulness", PREFERENCE,
           "HelpSteer2 pairs preferring the more helpful response (nvidia/HelpSteer2, train / validation)",
           hub_id="nvidia/HelpSteer2", test_split="validation", columns=("prompt", "response", "helpfulness"),
           convert=helpsteer2_converter("helpfulness")),
    Preset("helpsteer2_verbosity", PREFERENCE,
           "HelpSteer2 pairs preferring the more verbose response (nvidia/HelpSteer2, train / validation)",
           hub_id="nvidia/HelpSteer2", test_split="validation", columns=("prompt", "response", "verbosity"),
           convert=helpsteer2_converter("verbosity")),
    Preset("ultrafeedback", PREFERENCE,
           "UltraFeedback binarized preferences (HuggingFaceH4/ultrafeedback_binarized, train_prefs / test_prefs)",
           hub_id="HuggingFaceH4/ultrafeedback_binarized", train_split="train_prefs", test_split="test_prefs",
           columns=("prompt", "chosen", "rejected"), convert=ultrafeedback_converter),
    Preset("builtin:sentiment", COMPLETION, "offline: reviews tagged ' sunny' (positive) / ' rainy' (negative)",
           build=_build_sentiment),
    Preset("builtin:objects", COMPLETION, "offline: animals tagged ' meadow', vehicles tagged ' highway'",
           build=_build_objects),
    Preset("builtin:helpful", PREFERENCE, "offline: the correct sum preferred to a wrong one",
           build=_preference_builder("helpful")),
    Preset("builtin:verbose", PREFERENCE, "offline: a step-by-step answer preferred to a bare number",
           build=_preference_builder("verbose")),
)  # fmt: skip


def list_presets() -> dict[str, str]:
    """Each preset's name and one-line description."""
    return {name: preset.description for name, preset in PRESETS.items()}


# ---- task entries -----------------------------------------------------------------------------------------------

SPEC_KEYS = tuple(f.name for f in dataclasses.fields(TaskSpec))


def task_spec_from_dict(entry: dict | str) -> TaskSpec:
    """A task entry of an experiment's YAML as a :class:`TaskSpec`.

    A bare string is a preset name or a local path (named after the file or folder). A mapping holds
    :class:`TaskSpec`'s fields; ``name`` defaults to the preset, the path's stem or the Hub id.
    """
    if isinstance(entry, str):
        if entry in PRESETS:
            return TaskSpec(name=entry, preset=entry)
        if not _looks_like_path(entry):
            raise UserError(f"task {entry!r}: not a preset ({_known_presets()}) nor a local file or folder.")
        return TaskSpec(name=Path(entry).stem or entry, path=entry)
    if not isinstance(entry, dict):
        raise UserError(
            f"task entry {entry!r}: a {type(entry).__name__}; give a preset name, a path, or a mapping with "
            f"{', '.join(SPEC_KEYS)}."
        )
    label = entry.get("name") or entry.get("preset") or entry.get("path") or entry.get("hub_id") or "?"
    unknown = sorted(set(entry) - set(SPEC_KEYS), key=str)
    if unknown:
        raise UserError(
            f"task {label}: unknown key(s) {', '.join(map(str, unknown))}; the allowed keys are {', '.join(SPEC_KEYS)}."
        )
    values = dict(entry)
    if values.get("name") is None:
        source = values.get("preset") or values.get("path") or values.get("hub_id")
        if not isinstance(source, str):
            raise UserError(f"task entry {entry!r}: give a `name` and one of preset, path or hub_id.")
        values["name"] = Path(source).stem if values.get("path") and not values.get("preset") else source
    spec = TaskSpec(**values)
    check_spec(spec)
    return spec


def _looks_like_path(text: str) -> bool:
    path = Path(text).expanduser()
    return (
        path.exists() or "/" in text or "\\" in text or path.suffix in SPLIT_FILE_TYPES or text.startswith((".", "~"))
    )


def _known_presets() -> str:
    return f"known presets: {', '.join(PRESETS)}"


def check_spec(spec: TaskSpec) -> None:
    """Refuse a :class:`TaskSpec` whose fields cannot work together (types, sources, sizes)."""
    task = spec.name
    if not isinstance(task, str) or not task:
        raise UserError(f"task entry {spec!r}: `name` must be a non-empty string.")
    for key in ("preset", "path", "hub_id", "hub_config", "train_split", "test_split"):
        value = getattr(spec, key)
        if value is not None and not (isinstance(value, str) and value):
            raise UserError(f"task {task}: `{key}` is {value!r}; give a non-empty string.")
    for key in ("max_train", "max_test"):
        value = getattr(spec, key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise UserError(f"task {task}: `{key}` is {value!r}; give a positive whole number (or leave it out).")
    if spec.columns is not None and (
        not isinstance(spec.columns, dict)
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in spec.columns.items())
    ):
        raise UserError(f"task {task}: `columns` must map our column names to the source's ({{prompt: question}}).")
    if spec.preset is not None:
        if spec.preset not in PRESETS:
            raise UserError(f"task {task}: unknown preset {spec.preset!r}; {_known_presets()}.")
        if spec.hub_id or spec.hub_config or spec.columns:
            raise UserError(
                f"task {task}: preset {spec.preset} fixes its Hub data and columns; drop hub_id / hub_config / "
                "columns (or drop the preset to read another dataset)."
            )
        if PRESETS[spec.preset].build is not None and spec.path:
            raise UserError(f"task {task}: {spec.preset} is generated in process; drop `path`.")
        return
    if spec.path and spec.hub_id:
        raise UserError(f"task {task}: give either `path` or `hub_id`, not both.")
    if not spec.path and not spec.hub_id:
        raise UserError(f"task {task}: give a `preset` ({_known_presets()}), a `path` or a `hub_id`.")
    if spec.columns is not None:
        _kind_of(task, spec.columns.keys(), "the `columns` mapping")


# ---- loading ----------------------------------------------------------------------------------------------------


def load_task(
    spec: TaskSpec, *, is_encoder_decoder: bool, seed: int = 0, max_candidates: int = MAX_CANDIDATES
) -> TaskData:
    """Load and validate one task: string rows for both splits, sampled with ``seed``, and its candidate set.

    Raises:
        UserError: an unknown preset, a missing file or split, columns that do not match, a split with no (labelled)
            rows, train/test overlap in a local folder, non-string fields, an unreachable Hub.
    """
    check_spec(spec)
    task = spec.name
    if spec.preset is not None:
        preset = PRESETS[spec.preset]
        if preset.build is not None:
            return _builtin_task(spec, preset, is_encoder_decoder, seed, max_candidates)
        kind, (train, test) = preset.kind, _preset_rows(spec, preset, is_encoder_decoder)
        source = f"preset {preset.name} ({preset.hub_id}" + (f", local copy {spec.path})" if spec.path else ")")
    elif spec.hub_id is not None:
        (kind, train, test), source = _hub_rows(spec), f"Hub dataset {spec.hub_id}"
    else:
        (kind, train, test), source = _local_rows(spec, seed), str(spec.path)
    train = _sample(train, spec.max_train, seed, "train")
    test = _sample(test, spec.max_test, seed, "test")
    candidates = closed_candidates(train, test, max_candidates) if kind == COMPLETION else None
    return TaskData(name=task, kind=kind, train=train, test=test, candidates=candidates, source=source)


def closed_candidates(train: list[Row], test: list[Row], max_candidates: int = MAX_CANDIDATES) -> list[str] | None:
    """The sorted distinct train completions if they are at most ``max_candidates`` and cover every test completion."""
    completions = {row["completion"] for row in train}
    if len(completions) > max_candidates or any(row["completion"] not in completions for row in test):
        return None
    return sorted(completions)


def _builtin_task(
    spec: TaskSpec, preset: Preset, is_encoder_decoder: bool, seed: int, max_candidates: int
) -> TaskData:
    assert preset.build is not None
    n_train, n_test = spec.max_train or BUILTIN_TRAIN, spec.max_test or BUILTIN_TEST
    train, test = preset.build(n_train, n_test, seed, is_encoder_decoder)
    candidates = closed_candidates(train, test, max_candidates) if preset.kind == COMPLETION else None
    return TaskData(spec.name, preset.kind, train, test, candidates, f"preset {preset.name} (generated, seed {seed})")


def _split_names(spec: TaskSpec, preset: Preset) -> tuple[str, str]:
    """The preset's splits, unless the entry names others (a default name stands for the preset's own split)."""
    train = spec.train_split if spec.train_split != "train" else preset.train_split
    test = spec.test_split if spec.test_split != "test" else preset.test_split
    return train, test


def _preset_rows(spec: TaskSpec, preset: Preset, is_encoder_decoder: bool) -> tuple[list[Row], list[Row]]:
    assert preset.convert is not None
    assert preset.hub_id is not None
    task, splits = spec.name, _split_names(spec, preset)
    if spec.path:
        raw = _local_splits(task, Path(spec.path).expanduser(), splits)
    else:
        what = f"preset {preset.name} needs the Hub dataset {preset.hub_id}"
        raw = {s: _hub_split(task, preset.hub_id, preset.config, s, preset.revision, what, preset.load_hint())
               for s in splits}  # fmt: skip
    out = []
    for split, role in zip(splits, ("train", "test"), strict=True):
        rows, where = raw[split]
        _check_columns(task, rows, preset.columns, where, f"preset {preset.name} reads")
        converted = preset.convert(task, rows, where, is_encoder_decoder)
        if not converted:
            raise _no_usable_rows(task, preset, where, len(rows), role)
        out.append(converted)
    return out[0], out[1]


def _no_usable_rows(task: str, preset: Preset, where: str, n_rows: int, role: str) -> UserError:
    if preset.kind == PREFERENCE:
        return UserError(
            f"task {task}: {where} yields no preference pairs from its {n_rows} rows (each pair needs two different "
            "responses to one prompt with different scores); give a split with rated responses."
        )
    if role == "test":
        return UserError(
            f"task {task}: {where} has no labelled rows ({n_rows} rows, all unlabelled): its labels are hidden, as in "
            "GLUE's test splits; set `test_split` to a labelled split (e.g. validation)."
        )
    return UserError(
        f"task {task}: {where} has no labelled rows ({n_rows} rows, all unlabelled); give a split with labels."
    )


def _hub_rows(spec: TaskSpec) -> tuple[str, list[Row], list[Row]]:
    assert spec.hub_id is not None
    what = f"the Hub dataset {spec.hub_id}"
    hint = f"datasets.load_dataset({spec.hub_id!r}" + (f", {spec.hub_config!r})" if spec.hub_config else ")")
    out = []
    for split in (spec.train_split, spec.test_split):
        rows, where = _hub_split(spec.name, spec.hub_id, spec.hub_config, split, None, what, hint)
        out.append(_mapped_rows(spec.name, rows, where, spec.columns))
    (kind, train), (_, test) = out
    return kind, train, test


def _local_rows(spec: TaskSpec, seed: int) -> tuple[str, list[Row], list[Row]]:
    """A folder with one file per split (train/test overlap refused), or one file with a held-out test share."""
    task, path = spec.name, Path(str(spec.path)).expanduser()
    if not path.exists():
        raise UserError(
            f"task {task}: {path} does not exist; give a folder with {spec.train_split}.jsonl and "
            f"{spec.test_split}.jsonl, a .jsonl/.json/.csv file, or a preset ({_known_presets()})."
        )
    if path.is_file():
        rows, where = _read_file(task, path), str(path)
        kind, mapped = _mapped_rows(task, rows, where, spec.columns)
        train, test = _hold_out(task, mapped, seed, where)
        return kind, train, test
    raw = _local_splits(task, path, (spec.train_split, spec.test_split))
    kind, train = _mapped_rows(task, *raw[spec.train_split], spec.columns)
    test_kind, test = _mapped_rows(task, *raw[spec.test_split], spec.columns)
    if kind != test_kind:
        raise UserError(f"task {task}: {path}: the {spec.train_split} rows are {kind} rows but the {spec.test_split} "
                        f"rows are {test_kind} rows; give both splits the same columns.")  # fmt: skip
    overlap = {row["prompt"] for row in train} & {row["prompt"] for row in test}
    if overlap:
        raise UserError(
            f"task {task}: {len(overlap)} prompt(s) of {raw[spec.test_split][1]} also appear in "
            f"{raw[spec.train_split][1]} (e.g. {next(iter(sorted(overlap)))!r}); remove them from one split so the "
            "test measures held-out items."
        )
    return kind, train, test


def _hold_out(task: str, rows: list[Row], seed: int, where: str) -> tuple[list[Row], list[Row]]:
    """Split one file's rows: a seeded fifth (at most 200 rows) is the test, whole prompts at a time (no overlap)."""
    prompts = sorted({row["prompt"] for row in rows})
    if len(prompts) < 2:
        raise UserError(f"task {task}: {where} has {len(prompts)} distinct prompt(s); give at least 2 (one is held "
                        "out), or a folder with train.jsonl and test.jsonl.")  # fmt: skip
    random.Random(f"{seed}:holdout").shuffle(prompts)
    target = min(HOLDOUT_MAX, max(1, round(HOLDOUT_SHARE * len(rows))))
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["prompt"]] = counts.get(row["prompt"], 0) + 1
    held: set[str] = set()
    total = 0
    for prompt in prompts[:-1]:  # the last prompt always stays in train
        if total >= target:
            break
        held.add(prompt)
        total += counts[prompt]
    return [r for r in rows if r["prompt"] not in held], [r for r in rows if r["prompt"] in held]


# ---- reading ----------------------------------------------------------------------------------------------------


def _read_file(task: str, path: Path) -> list[RawRow]:
    """A data file's rows through :func:`delta_trl.data.read_records` (Parquet through pyarrow)."""
    from delta_trl.data import read_records

    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as err:  # pyarrow's errors on a damaged or non-Parquet file
            raise UserError(f"task {task}: {path} is not a readable Parquet file ({one_line(err)}).") from err
        if not rows:
            raise UserError(f"task {task}: {path} has no rows; give a split with data.")
        return rows
    try:
        return read_records(path)
    except (ValueError, OSError) as err:
        raise UserError(f"task {task}: {one_line(err)}") from err


def _local_splits(task: str, folder: Path, splits: Iterable[str]) -> dict[str, tuple[list[RawRow], str]]:
    """Each split's rows from ``folder``: ``SPLIT.jsonl`` (or .json/.csv/.parquet), or a ``save_to_disk`` folder."""
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise UserError(f"task {task}: {folder} {what}; give the folder holding one file per split "
                        f"({', '.join(f'{s}.jsonl' for s in splits)}) or a save_to_disk folder.")  # fmt: skip
    saved = None
    out = {}
    for split in splits:
        file = next(
            (folder / f"{split}{ext}" for ext in SPLIT_FILE_TYPES if (folder / f"{split}{ext}").is_file()), None
        )
        if file is not None:
            out[split] = (_read_file(task, file), str(file))
        elif (folder / "dataset_dict.json").is_file():
            saved = saved if saved is not None else _load_from_disk(task, folder)
            if split not in saved:
                raise UserError(f"task {task}: the saved dataset {folder} has no split {split!r}; its splits are "
                                f"{', '.join(saved)}.")  # fmt: skip
            out[split] = (
                _nonempty(task, saved[split].to_list(), f"{folder} split {split}"),
                f"{folder} split {split}",
            )
        elif (folder / split / "state.json").is_file():
            data = _load_from_disk(task, folder / split)
            out[split] = (_nonempty(task, data.to_list(), str(folder / split)), str(folder / split))
        else:
            present = sorted(p.name for p in folder.iterdir())[:12]
            raise UserError(
                f"task {task}: {folder} has no {split!r} split: expected {split}.jsonl (or .json/.csv/.parquet) or a "
                f"save_to_disk folder; it holds {', '.join(present) or 'nothing'}."
            )
    return out


def _load_from_disk(task: str, folder: Path) -> Any:
    from datasets import load_from_disk

    try:
        return load_from_disk(str(folder))
    except Exception as err:  # datasets raises FileNotFoundError/ValueError/Arrow errors on a damaged folder
        raise UserError(f"task {task}: {folder} is not a readable save_to_disk folder ({one_line(err)}).") from err


def _nonempty(task: str, rows: list[RawRow], where: str) -> list[RawRow]:
    if not rows:
        raise UserError(f"task {task}: {where} has no rows; give a split with data.")
    return rows


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``HF_DATASETS_OFFLINE``) is set: a download would only fail, after retries."""
    return any(
        os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def _unreachable(task: str, what: str, hint: str) -> UserError:
    return UserError(
        f"task {task}: {what}, which cannot be reached (offline?); download it where there is internet (e.g. "
        f"`{hint}.save_to_disk(DIR)` or one jsonl per split) and give `path: DIR` in the task entry, or use a local "
        "folder with train.jsonl/test.jsonl."
    )


def _is_connection_error(err: BaseException) -> bool:
    """The exception (or one it chains to) means the Hub could not be reached, not that the id is wrong."""
    seen = err
    while seen is not None:
        names = {cls.__name__ for cls in type(seen).__mro__}
        if names & {"ConnectionError", "OfflineModeIsEnabled", "TimeoutError", "ConnectError", "TimeoutException",
                    "LocalEntryNotFoundError"}:  # fmt: skip
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _hub_split(
    task: str, hub_id: str, config: str | None, split: str, revision: str | None, what: str, hint: str
) -> tuple[list[RawRow], str]:
    """One Hub split's rows; offline is refused before ``datasets`` is called (it would retry for a while)."""
    if hub_offline():
        raise _unreachable(task, what, hint)
    from datasets import load_dataset

    where = f"{hub_id}" + (f" ({config})" if config else "") + f" split {split}"
    try:
        data = load_dataset(hub_id, config, split=split, revision=revision)
    except Exception as err:  # offline, unknown id/config/split, gated: every failure means "cannot use this"
        if _is_connection_error(err):
            raise _unreachable(task, what, hint) from err
        raise UserError(
            f"task {task}: loading {where} from the Hub failed ({type(err).__name__}: {one_line(err)}); check the id, "
            "config and split names."
        ) from err
    return _nonempty(task, data.to_list(), where), where


# ---- columns and values -----------------------------------------------------------------------------------------


def _kind_of(task: str, columns: Iterable[str], where: str) -> str:
    """``completion`` or ``preference`` from the column names; a UserError naming what is there otherwise."""
    names = set(columns)
    if set(PREFERENCE_COLUMNS) <= names:
        return PREFERENCE
    if set(COMPLETION_COLUMNS) <= names:
        return COMPLETION
    raise UserError(
        f"task {task}: {where} has the columns {', '.join(sorted(names))}; expected prompt/completion (completion "
        "task) or prompt/chosen/rejected (preference task), or a `columns` mapping to them."
    )


def _check_columns(task: str, rows: list[RawRow], expected: Iterable[str], where: str, reader: str) -> None:
    found = set().union(*(row.keys() for row in rows))
    missing = [c for c in expected if c not in found]
    if missing:
        raise UserError(
            f"task {task}: {where} lacks the column(s) {', '.join(missing)}; it has {', '.join(sorted(found))}, and "
            f"{reader} {', '.join(expected)}. Give the data with the Hub dataset's columns."
        )
    for i, row in enumerate(rows):
        absent = [c for c in expected if c not in row]
        if absent:
            raise UserError(f"task {task}: {where}, row {i} lacks {', '.join(absent)}; every row needs them.")


def _mapped_rows(task: str, rows: list[RawRow], where: str, columns: dict[str, str] | None) -> tuple[str, list[Row]]:
    """Rows renamed through ``columns`` (ours → source's) and cut to our columns; the kind from their names."""
    found = set().union(*(row.keys() for row in rows))
    mapping = dict(columns) if columns else {c: c for c in found if c in PREFERENCE_COLUMNS + COMPLETION_COLUMNS}
    kind = _kind_of(task, mapping if columns else found, where)
    ours = PREFERENCE_COLUMNS if kind == PREFERENCE else COMPLETION_COLUMNS
    missing = [mapping[c] for c in ours if mapping[c] not in found]
    if missing:
        raise UserError(
            f"task {task}: {where} lacks the column(s) {', '.join(missing)} named in `columns`; it has "
            f"{', '.join(sorted(found))}."
        )
    return kind, [{c: _string(task, row, mapping[c], f"{where}, row {i}") for c in ours} for i, row in enumerate(rows)]


def _string(task: str, row: RawRow, column: str, where: str) -> str:
    if column not in row:
        raise UserError(f"task {task}: {where} lacks `{column}`; every row needs it.")
    value = row[column]
    if not isinstance(value, str):
        raise UserError(
            f"task {task}: {where}: `{column}` is a {type(value).__name__} ({one_line(repr(value))[:60]}), not a "
            "string; experiment tasks take plain-string fields."
        )
    return value


def _sample(rows: list[Row], limit: int | None, seed: int, salt: str) -> list[Row]:
    """The first ``limit`` rows after a shuffle seeded by ``seed`` and the split (all rows, in order, without one)."""
    if limit is None or limit >= len(rows):
        return rows
    order = list(range(len(rows)))
    random.Random(f"{seed}:{salt}").shuffle(order)
    return [rows[i] for i in order[:limit]]


__all__ = [
    "PRESETS",
    "Preset",
    "TaskData",
    "TaskSpec",
    "builtin_objects",
    "closed_candidates",
    "format_nli",
    "list_presets",
    "load_task",
    "task_spec_from_dict",
]
