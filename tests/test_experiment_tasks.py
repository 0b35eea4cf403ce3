"""Experiment tasks: presets read from local copies with the real Hub schemas, built-in tasks, local data, errors."""

import csv
import json
import time
from pathlib import Path

import pytest

from delta_trl.errors import UserError
from delta_trl.experiment import tasks as tasks_module
from delta_trl.experiment.tasks import (
    PRESETS,
    TaskSpec,
    builtin_objects,
    list_presets,
    load_task,
    task_spec_from_dict,
)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def write_splits(folder: Path, splits: dict[str, list[dict]]) -> Path:
    for split, rows in splits.items():
        write_jsonl(folder / f"{split}.jsonl", rows)
    return folder


def preset_task(preset: str, folder: Path, *, t5: bool, **fields) -> "tasks_module.TaskData":
    return load_task(TaskSpec(name=preset, preset=preset, path=str(folder), **fields), is_encoder_decoder=t5)


# ---- NLI presets: schemas as on the Hub -------------------------------------------------------------------------

SNLI = {
    "train": [
        {"premise": "A man plays a guitar.", "hypothesis": "A person makes music.", "label": 0},
        {"premise": "A dog runs.", "hypothesis": "An animal sleeps.", "label": 2},
        {"premise": "Kids play.", "hypothesis": "Kids play outside.", "label": 1},
        {"premise": "A cat sits.", "hypothesis": "A cat waits.", "label": -1},  # no annotator consensus
    ],
    "validation": [{"premise": "V p.", "hypothesis": "V h.", "label": 0}],
    "test": [
        {"premise": "Two men talk.", "hypothesis": "People speak.", "label": 0},
        {"premise": "A girl swims.", "hypothesis": "A girl reads.", "label": -1},
    ],
}


def test_snli_t5_and_causal_formatting_drop_unlabelled_rows(tmp_path):
    folder = write_splits(tmp_path / "snli", SNLI)
    t5 = preset_task("snli", folder, t5=True)
    assert t5.kind == "completion"
    assert t5.train == [
        {"prompt": "premise: A man plays a guitar. hypothesis: A person makes music.", "completion": "entailment"},
        {"prompt": "premise: A dog runs. hypothesis: An animal sleeps.", "completion": "contradiction"},
        {"prompt": "premise: Kids play. hypothesis: Kids play outside.", "completion": "neutral"},
    ]
    assert t5.test == [{"prompt": "premise: Two men talk. hypothesis: People speak.", "completion": "entailment"}]
    assert t5.candidates == ["contradiction", "entailment", "neutral"]
    assert "stanfordnlp/snli" in t5.source

    causal = preset_task("snli", folder, t5=False)
    assert causal.train[0] == {
        "prompt": "Premise: A man plays a guitar.\nHypothesis: A person makes music.\nRelation:",
        "completion": " entailment",
    }
    assert causal.test == [
        {"prompt": "Premise: Two men talk.\nHypothesis: People speak.\nRelation:", "completion": " entailment"}
    ]
    assert causal.candidates == [" contradiction", " entailment", " neutral"]


def test_mnli_tests_on_validation_matched_and_a_named_split_wins(tmp_path):
    row = {"promptID": 1, "pairID": "1n", "genre": "fiction", "premise_binary_parse": "( x )", "premise_parse": "x"}
    folder = write_splits(
        tmp_path / "mnli",
        {
            "train": [{**row, "premise": "P.", "hypothesis": "H.", "label": 1}],
            "validation_matched": [{**row, "premise": "Matched.", "hypothesis": "H.", "label": 2}],
            "validation_mismatched": [{**row, "premise": "Mismatched.", "hypothesis": "H.", "label": 0}],
        },
    )
    data = preset_task("mnli", folder, t5=True)
    assert data.train == [{"prompt": "premise: P. hypothesis: H.", "completion": "neutral"}]
    assert data.test == [{"prompt": "premise: Matched. hypothesis: H.", "completion": "contradiction"}]
    other = preset_task("mnli", folder, t5=True, test_split="validation_mismatched")
    assert other.test == [{"prompt": "premise: Mismatched. hypothesis: H.", "completion": "entailment"}]


GLUE_RTE = {
    "train": [
        {"sentence1": "Paris is in France.", "sentence2": "Paris is French.", "label": 0, "idx": 0},
        {"sentence1": "It rained.", "sentence2": "It was sunny.", "label": 1, "idx": 1},
    ],
    "validation": [{"sentence1": "A won.", "sentence2": "B lost.", "label": 1, "idx": 0}],
    "test": [{"sentence1": "Hidden.", "sentence2": "Hidden too.", "label": -1, "idx": 0}],  # GLUE hides test labels
}


def test_rte_tests_on_validation_and_refuses_the_hidden_test_split(tmp_path):
    folder = write_splits(tmp_path / "rte", GLUE_RTE)
    data = preset_task("rte", folder, t5=False)
    assert data.train[1] == {
        "prompt": "Premise: It rained.\nHypothesis: It was sunny.\nRelation:",
        "completion": " not_entailment",
    }
    assert data.test == [
        {"prompt": "Premise: A won.\nHypothesis: B lost.\nRelation:", "completion": " not_entailment"}
    ]
    assert data.candidates == [" entailment", " not_entailment"]
    write_jsonl(folder / "validation.jsonl", GLUE_RTE["test"])  # a copy whose validation labels are hidden too
    with pytest.raises(UserError, match=r"validation\.jsonl has no labelled rows.*hidden.*`test_split`"):
        preset_task("rte", folder, t5=True)


def test_qnli_uses_the_sentence_as_premise_and_the_question_as_hypothesis(tmp_path):
    rows = [{"question": "Where is Paris?", "sentence": "Paris is in France.", "label": 0, "idx": 0}]
    folder = write_splits(tmp_path / "qnli", {"train": rows, "validation": rows})
    data = preset_task("qnli", folder, t5=True)
    assert data.test == [
        {"prompt": "premise: Paris is in France. hypothesis: Where is Paris?", "completion": "entailment"}
    ]


def test_scitail_tsv_format_string_labels(tmp_path):
    folder = write_splits(
        tmp_path / "scitail",
        {
            "train": [
                {"premise": "Water boils at 100 C.", "hypothesis": "Water boils.", "label": "entails"},
                {"premise": "Rocks are hard.", "hypothesis": "The sun is hot.", "label": "neutral"},
            ],
            "test": [{"premise": "Ice melts.", "hypothesis": "Ice is solid.", "label": "neutral"}],
        },
    )
    data = preset_task("scitail", folder, t5=True)
    assert [row["completion"] for row in data.train] == ["entailment", "neutral"]
    assert data.test == [{"prompt": "premise: Ice melts. hypothesis: Ice is solid.", "completion": "neutral"}]


def test_sick_from_a_csv_copy_reads_text_label_ids(tmp_path):
    folder = tmp_path / "sick"
    folder.mkdir()
    columns = ["id", "sentence_A", "sentence_B", "label", "relatedness_score"]
    for split, rows in {
        "train": [["1", "A boy runs.", "A kid runs.", "0", "4.5"], ["2", "A man eats.", "Nobody eats.", "2", "3.1"]],
        "test": [["3", "A girl sings.", "A girl performs.", "1", "4.0"]],
    }.items():
        with (folder / f"{split}.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(columns)
            writer.writerows(rows)
    data = preset_task("sick", folder, t5=True)
    assert [row["completion"] for row in data.train] == ["entailment", "contradiction"]
    assert data.test == [{"prompt": "premise: A girl sings. hypothesis: A girl performs.", "completion": "neutral"}]


def test_a_save_to_disk_copy_of_a_preset(tmp_path):
    from datasets import Dataset, DatasetDict

    DatasetDict({split: Dataset.from_list(rows) for split, rows in SNLI.items()}).save_to_disk(tmp_path / "saved")
    data = preset_task("snli", tmp_path / "saved", t5=True)
    assert len(data.train) == 3
    assert data.test == [{"prompt": "premise: Two men talk. hypothesis: People speak.", "completion": "entailment"}]


# ---- preference presets -----------------------------------------------------------------------------------------


def helpsteer_row(prompt: str, response: str, helpfulness: int, verbosity: int) -> dict:
    return {"prompt": prompt, "response": response, "helpfulness": helpfulness, "correctness": 3, "coherence": 4,
            "complexity": 2, "verbosity": verbosity}  # fmt: skip


HELPSTEER2 = {
    "train": [
        helpsteer_row("P1", "r1", helpfulness=3, verbosity=1),
        helpsteer_row("P2", "s1", helpfulness=2, verbosity=0),
        helpsteer_row("P1", "r2", helpfulness=1, verbosity=2),
        helpsteer_row("P1", "r3", helpfulness=3, verbosity=4),
        helpsteer_row("P2", "s2", helpfulness=2, verbosity=2),
    ],
    "validation": [helpsteer_row("Q", "a", 0, 3), helpsteer_row("Q", "b", 4, 1)],
}


def test_helpsteer2_pairs_by_attribute_hand_worked(tmp_path):
    folder = write_splits(tmp_path / "hs2", HELPSTEER2)
    helpful = preset_task("helpsteer2_helpfulness", folder, t5=False)
    # P1: r1 (3) > r2 (1); r1 = r3 (3) makes no pair; r3 (3) > r2 (1). P2: equal helpfulness, no pair.
    assert helpful.train == [
        {"prompt": "P1", "chosen": "r1", "rejected": "r2"},
        {"prompt": "P1", "chosen": "r3", "rejected": "r2"},
    ]
    assert helpful.test == [{"prompt": "Q", "chosen": "b", "rejected": "a"}]
    assert helpful.kind == "preference"
    assert helpful.candidates is None

    verbose = preset_task("helpsteer2_verbosity", folder, t5=False)
    assert verbose.train == [
        {"prompt": "P1", "chosen": "r2", "rejected": "r1"},
        {"prompt": "P1", "chosen": "r3", "rejected": "r1"},
        {"prompt": "P1", "chosen": "r3", "rejected": "r2"},
        {"prompt": "P2", "chosen": "s2", "rejected": "s1"},
    ]
    assert verbose.test == [{"prompt": "Q", "chosen": "a", "rejected": "b"}]
    write_jsonl(folder / "validation.jsonl", [helpsteer_row("Q", "a", 2, 1), helpsteer_row("Q", "b", 2, 1)])
    with pytest.raises(UserError, match=r"validation\.jsonl yields no preference pairs from its 2 rows"):
        preset_task("helpsteer2_verbosity", folder, t5=False)


def chat(prompt: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def test_ultrafeedback_takes_the_last_assistant_message(tmp_path):
    def row(prompt: str, good: str, bad: str) -> dict:
        return {"prompt": prompt, "prompt_id": "x", "chosen": chat(prompt, good), "rejected": chat(prompt, bad),
                "messages": chat(prompt, good), "score_chosen": 8.0, "score_rejected": 4.0}  # fmt: skip

    folder = write_splits(
        tmp_path / "uf",
        {
            "train_prefs": [row("Say hi.", "Hi!", "No."), row("Add 1+1.", "2", "3")],
            "test_prefs": [row("Name a color.", "Blue.", "Seven.")],
            "train_sft": [row("unused", "a", "b")],
        },
    )
    data = preset_task("ultrafeedback", folder, t5=False)
    assert data.train == [
        {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."},
        {"prompt": "Add 1+1.", "chosen": "2", "rejected": "3"},
    ]
    assert data.test == [{"prompt": "Name a color.", "chosen": "Blue.", "rejected": "Seven."}]


# ---- built-in tasks ---------------------------------------------------------------------------------------------


def test_builtin_objects_t5_strips_the_space_and_sizes_follow_max():
    causal = load_task(task_spec_from_dict("builtin:objects"), is_encoder_decoder=False, seed=2)
    assert (len(causal.train), len(causal.test)) == (320, 80)
    assert causal.candidates == [" highway", " meadow"]
    assert causal.train + causal.test == builtin_objects(400, seed=2)  # bench/task_addition.py's data
    t5 = load_task(
        TaskSpec("obj", preset="builtin:objects", max_train=10, max_test=5), is_encoder_decoder=True, seed=2
    )
    assert (len(t5.train), len(t5.test)) == (10, 5)
    assert t5.candidates == ["highway", "meadow"]
    assert t5.train[0]["prompt"] == causal.train[0]["prompt"]


def test_builtin_sentiment_and_preferences():
    sentiment = load_task(task_spec_from_dict("builtin:sentiment"), is_encoder_decoder=False)
    assert (len(sentiment.train), len(sentiment.test)) == (320, 80)
    assert sentiment.candidates == [" rainy", " sunny"]
    helpful = load_task(TaskSpec("h", preset="builtin:helpful", max_train=4, max_test=2), is_encoder_decoder=False)
    assert helpful.kind == "preference"
    assert (len(helpful.train), len(helpful.test)) == (4, 2)
    assert helpful.train[0]["prompt"].startswith("What is ")
    assert all(isinstance(v, str) for row in helpful.train for v in row.values())
    assert {"builtin:sentiment", "builtin:objects", "builtin:helpful", "builtin:verbose"} <= set(list_presets())


# ---- local data -------------------------------------------------------------------------------------------------


def completion_rows(n: int, offset: int = 0, labels: tuple[str, ...] = (" a", " b")) -> list[dict]:
    return [{"prompt": f"item {i}", "completion": labels[i % len(labels)]} for i in range(offset, offset + n)]


def test_local_folder_kind_and_candidates(tmp_path):
    folder = write_splits(tmp_path / "mine", {"train": completion_rows(6), "test": completion_rows(2, offset=6)})
    data = load_task(task_spec_from_dict(str(folder)), is_encoder_decoder=False)
    assert data.name == "mine"
    assert data.kind == "completion"
    assert data.candidates == [" a", " b"]
    assert load_task(TaskSpec("m", path=str(folder)), is_encoder_decoder=False, max_candidates=1).candidates is None
    # a test completion outside train's set: open-ended, scored by generation
    write_jsonl(folder / "test.jsonl", [{"prompt": "item 9", "completion": " c"}])
    assert load_task(TaskSpec("m", path=str(folder)), is_encoder_decoder=False).candidates is None

    prefs = write_splits(
        tmp_path / "prefs",
        {"train": [{"q": "x", "good": "y", "bad": "z"}], "test": [{"q": "u", "good": "v", "bad": "w"}]},
    )
    spec = task_spec_from_dict({"name": "p", "path": str(prefs), "columns": {"prompt": "q", "chosen": "good",
                                                                            "rejected": "bad"}})  # fmt: skip
    data = load_task(spec, is_encoder_decoder=False)
    assert data.kind == "preference"
    assert data.test == [{"prompt": "u", "chosen": "v", "rejected": "w"}]


def test_single_file_holds_out_a_seeded_fifth_by_prompt(tmp_path):
    file = tmp_path / "one.jsonl"
    write_jsonl(file, completion_rows(50))
    data = load_task(TaskSpec("one", path=str(file)), is_encoder_decoder=False, seed=3)
    assert (len(data.train), len(data.test)) == (40, 10)
    assert not {r["prompt"] for r in data.train} & {r["prompt"] for r in data.test}
    assert load_task(TaskSpec("one", path=str(file)), is_encoder_decoder=False, seed=3).test == data.test
    assert load_task(TaskSpec("one", path=str(file)), is_encoder_decoder=False, seed=4).test != data.test


def test_max_train_sampling_is_deterministic(tmp_path):
    folder = write_splits(tmp_path / "d", {"train": completion_rows(30), "test": completion_rows(10, offset=30)})
    spec = TaskSpec("d", path=str(folder), max_train=5, max_test=3)
    first = load_task(spec, is_encoder_decoder=False, seed=0)
    assert (len(first.train), len(first.test)) == (5, 3)
    assert load_task(spec, is_encoder_decoder=False, seed=0) == first
    assert load_task(spec, is_encoder_decoder=False, seed=1).train != first.train
    assert all(row in completion_rows(30) for row in first.train)


# ---- errors -----------------------------------------------------------------------------------------------------


def test_spec_errors():
    with pytest.raises(UserError, match=r"unknown preset 'snlii'.*known presets: snli, mnli"):
        task_spec_from_dict({"name": "x", "preset": "snlii"})
    with pytest.raises(UserError, match=r"task 'snlii': not a preset \(known presets: snli"):
        task_spec_from_dict("snlii")
    with pytest.raises(
        UserError, match=r"task x: unknown key\(s\) max_rows, split; the allowed keys are name, preset"
    ):
        task_spec_from_dict({"name": "x", "preset": "snli", "split": "a", "max_rows": 3})
    with pytest.raises(UserError, match="`max_train` is 0"):
        task_spec_from_dict({"preset": "snli", "max_train": 0})
    with pytest.raises(UserError, match="either `path` or `hub_id`"):
        task_spec_from_dict({"name": "x", "path": "a", "hub_id": "b/c"})
    with pytest.raises(UserError, match="fixes its Hub data and columns"):
        task_spec_from_dict({"preset": "snli", "columns": {"prompt": "premise"}})
    assert task_spec_from_dict({"preset": "mnli", "path": "/data/mnli"}).name == "mnli"


def test_data_errors(tmp_path):
    def load(path, **fields):
        return load_task(TaskSpec("t", path=str(path), **fields), is_encoder_decoder=False)

    with pytest.raises(UserError, match=r"task t: .*missing does not exist"):
        load(tmp_path / "missing")
    folder = write_splits(tmp_path / "notest", {"train": completion_rows(2)})
    with pytest.raises(UserError, match=r"has no 'test' split: expected test\.jsonl.*it holds train\.jsonl"):
        load(folder)
    (folder / "test.jsonl").write_text("")
    with pytest.raises(UserError, match=r"test\.jsonl' has no rows"):
        load(folder)
    write_jsonl(folder / "test.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(UserError, match=r"has the columns answer, question; expected prompt/completion"):
        load(folder)
    write_jsonl(folder / "test.jsonl", [{"prompt": "q", "completion": 3}])
    with pytest.raises(UserError, match=r"test\.jsonl, row 0: `completion` is a int .*not a string"):
        load(folder)
    write_jsonl(folder / "test.jsonl", completion_rows(2))  # the same prompts as train
    with pytest.raises(UserError, match=r"task t: 2 prompt\(s\) of .*test\.jsonl also appear in .*train\.jsonl"):
        load(folder)
    with pytest.raises(UserError, match=r"lacks the column\(s\) text named in `columns`; it has completion, prompt"):
        load(folder, columns={"prompt": "text", "completion": "completion"})


def test_preset_data_errors(tmp_path):
    folder = write_splits(tmp_path / "snli", {"train": [{"sentence1": "a", "sentence2": "b", "label": 0}],
                                              "test": SNLI["test"]})  # fmt: skip
    with pytest.raises(UserError, match=r"lacks the column\(s\) premise, hypothesis; it has label, sentence1, "
                                        r"sentence2, and preset snli reads premise, hypothesis, label"):  # fmt: skip
        preset_task("snli", folder, t5=True)
    write_splits(folder, {"train": SNLI["train"], "test": [{**SNLI["test"][1]}]})
    with pytest.raises(UserError, match=r"test\.jsonl has no labelled rows \(1 rows, all unlabelled\)"):
        preset_task("snli", folder, t5=True)
    write_splits(folder, {"test": [{"premise": "p", "hypothesis": "h", "label": 7}]})
    with pytest.raises(UserError, match=r"row 0 has the label 7, which is none of 0, 1, 2"):
        preset_task("snli", folder, t5=True)
    with pytest.raises(UserError, match=r"has no 'validation_matched' split"):
        preset_task("mnli", folder, t5=True)


# ---- the Hub ----------------------------------------------------------------------------------------------------


def test_offline_preset_fails_fast_without_calling_datasets(monkeypatch):
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("load_dataset called offline"))
    start = time.perf_counter()
    with pytest.raises(UserError, match=r"task m: preset mnli needs the Hub dataset nyu-mll/multi_nli, which cannot "
                                        r"be reached \(offline\?\); download it .*save_to_disk\(DIR\).*`path: DIR`"):  # fmt: skip
        load_task(task_spec_from_dict({"name": "m", "preset": "mnli"}), is_encoder_decoder=True)
    assert time.perf_counter() - start < 1.0


def test_hub_connection_error_and_column_mapping(monkeypatch):
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nvidia/HelpSteer2' on the Hub (ConnectError)")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(
        UserError, match=r"preset helpsteer2_helpfulness needs the Hub dataset nvidia/HelpSteer2, which"
    ):
        load_task(TaskSpec("h", preset="helpsteer2_helpfulness"), is_encoder_decoder=False)

    calls = []

    def fake(hub_id, config, split, revision=None):
        calls.append((hub_id, config, split, revision))
        if hub_id == "RobZamp/sick":
            return datasets.Dataset.from_list([{"id": "1", "sentence_A": "a", "sentence_B": "b", "label": 0}])
        return datasets.Dataset.from_list([{"q": f"{split} q", "a": " yes", "extra": 1}])

    monkeypatch.setattr(datasets, "load_dataset", fake)
    data = load_task(
        task_spec_from_dict({"name": "h", "hub_id": "me/qa", "test_split": "dev", "columns": {"prompt": "q",
                                                                                             "completion": "a"}}),
        is_encoder_decoder=False,
    )  # fmt: skip
    assert calls == [("me/qa", None, "train", None), ("me/qa", None, "dev", None)]
    assert data.train == [{"prompt": "train q", "completion": " yes"}]
    assert data.source == "Hub dataset me/qa"
    load_task(TaskSpec("s", preset="sick", max_train=1), is_encoder_decoder=True)  # the Parquet export revision
    assert calls[-1] == ("RobZamp/sick", None, "test", "refs/convert/parquet")


def test_every_hub_preset_names_its_source_columns():
    for name, preset in PRESETS.items():
        assert (preset.build is None) == (preset.hub_id is not None), name
        if preset.hub_id:
            assert preset.columns, name
