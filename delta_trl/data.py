"""The one loader for local data files and Hub datasets, built on 🤗 ``datasets``.

Local ``.jsonl``/``.json``/``.csv``/``.txt`` files are read row by row first, so that a malformed line is reported
as ``file:line`` with what to do (``datasets``' own JSON builder reports an Arrow error without either), then handed
to ``datasets.Dataset``; anything else is a Hub dataset id for ``datasets.load_dataset``. Recipes, the CLI, the
evaluation sets and the curvature's reference text all load through here.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any


RECORD_FILE_TYPES = (".jsonl", ".json", ".csv", ".txt")


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a ``.jsonl`` (one JSON object per line), ``.json`` (a list of objects) or ``.csv`` file.

    Raises ``FileNotFoundError`` / ``ValueError`` with a message naming the file (and the line, for a malformed
    ``.jsonl`` line) and what to do.
    """
    return [row for _, row in read_located_records(path)]


def read_located_records(path: str | os.PathLike) -> list[tuple[str, dict[str, Any]]]:
    """:func:`read_records` with each row's location, ``"file:line"`` (``"file, record i"`` for ``.json``).

    A ``.txt`` file is one ``{"text": line}`` record per non-empty line.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"{str(path)!r} {what}; give a {'/'.join(RECORD_FILE_TYPES)} file.")
    if path.suffix not in RECORD_FILE_TYPES:
        raise ValueError(f"{str(path)!r}: unsupported file type {path.suffix!r}; use {', '.join(RECORD_FILE_TYPES)}.")
    rows: list[tuple[str, Any]] = []
    if path.suffix == ".jsonl":
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append((f"{path}:{number}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{path}:{number}: not valid JSON ({err.msg}, column {err.colno}); a .jsonl file holds one JSON "
                    "object per line."
                ) from err
    elif path.suffix == ".txt":
        lines = path.read_text().splitlines()
        rows = [(f"{path}:{number}", {"text": line}) for number, line in enumerate(lines, start=1) if line.strip()]
    elif path.suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{err.lineno}: not valid JSON ({err.msg}, column {err.colno}).") from err
        if not isinstance(data, list):
            raise ValueError(
                f"{path}: a .json file must hold a list of records ([{{...}}, ...]), not a {type(data).__name__}."
            )
        rows = [(f"{path}, record {i}", row) for i, row in enumerate(data)]
    else:
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            rows = [(f"{path}:{reader.line_num}", row) for row in reader]
    for where, row in rows:
        if not isinstance(row, dict):
            raise ValueError(
                f'{where}: a JSON {type(row).__name__} where a record ({{"column": value, ...}}) is expected.'
            )
    if not rows:
        raise ValueError(f"{str(path)!r} has no rows.")
    return rows


def looks_like_file(source: str) -> bool:
    """``source`` names a local file (it exists, or ends like a data file, or is a path), not a Hub dataset id."""
    path = Path(source)
    return path.exists() or path.suffix in RECORD_FILE_TYPES or source.startswith((".", "/", "~"))


def load_rows(
    source: str,
    flag: str,
    columns: Mapping[str, tuple[type, ...]],
    hint: str,
    *,
    config: str | None = None,
    split: str = "train",
) -> Any:  # datasets.DatasetDict
    """A local ``.jsonl``/``.json``/``.csv`` file or a Hub dataset, as a ``DatasetDict``, with its columns checked.

    Args:
        source: the file or Hub id; ``flag`` names it in messages (``"--dataset_name"``).
        columns: the required columns and the Python types each value may have (``{"prompt": (str,)}``).
        hint: the format to give, appended to a missing-column message.
        config: the Hub dataset's configuration (``datasets.load_dataset(source, config)``).
        split: the split whose columns are checked; a local file is that one split.

    Raises:
        FileNotFoundError, ValueError: a message naming the file and, for a bad row, its line.
        delta_trl.errors.UserError: a Hub dataset that cannot be loaded (offline, unknown id).
    """
    from datasets import Dataset, DatasetDict, load_dataset

    from delta_trl.errors import UserError, one_line

    if looks_like_file(source):
        rows = read_located_records(source)
        for where, row in rows:
            missing = sorted(set(columns) - set(row))
            if missing:
                raise ValueError(f"{where} lacks the column(s) {missing}; it has {sorted(row)}. {hint}")
            for name, kinds in columns.items():
                if not isinstance(row[name], kinds):
                    wanted = " or ".join("string" if k is str else "list of messages" for k in kinds)
                    raise ValueError(f"{where}: `{name}` is a {type(row[name]).__name__}, not a {wanted}. {hint}")
        try:
            return DatasetDict({split: Dataset.from_list([row for _, row in rows])})
        except Exception as err:  # pyarrow cannot type a column whose rows disagree
            raise ValueError(f"{source}: the rows do not share one schema ({one_line(err)}).") from err
    try:
        data = load_dataset(source, config)
    except Exception as err:  # offline, unknown id, no access, bad config: all mean "cannot load this id"
        raise UserError(
            f"{flag} {source}: no such local file, and loading it as a Hub dataset failed ({type(err).__name__}: "
            f"{one_line(err)}). Give a {'/'.join(RECORD_FILE_TYPES)} file, or check the id and the network "
            "(HF_HUB_OFFLINE=1 blocks downloads)."
        ) from err
    if split not in data:
        raise ValueError(f"{source} has no split {split!r}; its splits are {sorted(data)}.")
    missing = sorted(set(columns) - set(data[split].column_names))
    if missing:
        raise ValueError(f"{source} lacks the column(s) {missing}; it has {data[split].column_names}. {hint}")
    return data


def load_text_dataset(source: str, config: str | None = None, split: str = "train") -> Any:
    """Reference text as a ``datasets.Dataset``: a local file (rows as :func:`read_records` reads them) or a Hub id."""
    from datasets import Dataset, load_dataset

    path = Path(source)
    if path.is_dir():
        raise ValueError(f"{source!r} is a folder; pass a {'/'.join(RECORD_FILE_TYPES)} file or a Hub dataset id.")
    if looks_like_file(source):
        return Dataset.from_list(read_records(path))
    return load_dataset(source, config, split=split)
