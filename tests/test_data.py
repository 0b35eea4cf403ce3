"""The one loader for local data files: rows, their locations, and one-line errors naming file and line."""

import pytest

from delta_trl.data import load_rows, load_text_dataset, read_located_records


def test_each_file_type_gives_the_same_rows(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\n')
    (tmp_path / "a.json").write_text('[{"text": "one"}, {"text": "two"}]')
    (tmp_path / "a.csv").write_text("text\none\ntwo\n")
    (tmp_path / "a.txt").write_text("one\n\ntwo\n")
    for suffix in ("jsonl", "json", "csv", "txt"):
        dataset = load_text_dataset(str(tmp_path / f"a.{suffix}"))
        assert dataset["text"] == ["one", "two"], suffix
    assert [where for where, _ in read_located_records(tmp_path / "a.txt")] == [
        f"{tmp_path}/a.txt:1",
        f"{tmp_path}/a.txt:3",
    ]


def test_bad_files_are_named_with_their_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", completion: "b"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        load_rows(str(bad), "--dataset", {"prompt": (str,), "completion": (str,)}, "")
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"prompt": "a"}\n')
    with pytest.raises(
        ValueError, match=r"missing.jsonl:1 lacks the column\(s\) \['completion'\]; it has \['prompt'\]"
    ):
        load_rows(str(missing), "--dataset", {"prompt": (str,), "completion": (str,)}, "")
    with pytest.raises(ValueError, match="is a folder"):
        load_text_dataset(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_text_dataset(str(tmp_path / "nope.txt"))
