"""Read rows from JSONL, JSON, Parquet and CSV files and `datasets` folders, remembering where each came from.

Each row carries its origin ("file.jsonl:12") so that every later error can point at it.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignkit.errors import UserError

SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet", ".csv")


@dataclass
class Row:
    fields: dict[str, Any]
    origin: str  # "path:line" for text files, "path:row N" otherwise


def read_rows(paths: list[str]) -> list[Row]:
    if not paths:
        raise UserError("no data given: set 'data' (a file or a list of files)")
    rows: list[Row] = []
    for path in paths:
        rows.extend(read_source(Path(path)))
    return rows


def require(path: Path) -> None:
    if not path.exists():
        raise UserError(f"{path}: data file not found")


def read_source(path: Path) -> list[Row]:
    require(path)
    if path.is_dir():
        return _read_saved_dataset(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise UserError(f"{path}: unknown data file type '{suffix}' (use {', '.join(SUFFIXES)})")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: file is empty")
    if suffix == ".parquet":
        rows = _read_parquet(path)
    else:
        text = _read_text(path)
        if suffix == ".csv":
            rows = _read_csv(path, text)
        elif suffix == ".json":
            rows = _read_json(path, text)
        else:
            rows = _read_jsonl(path, text)
    if not rows:
        raise UserError(f"{path}: holds no rows")
    return rows


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte 0x{data[err.start]:02x})") from None


def _as_row(value: Any, origin: str) -> Row:
    if not isinstance(value, dict):
        raise UserError(f"{origin}: a row must be a JSON object, got {type(value).__name__}")
    return Row(value, origin)


def _read_jsonl(path: Path, text: str) -> list[Row]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{number}: malformed JSON ({err.msg} at column {err.colno})") from None
        rows.append(_as_row(value, f"{path}:{number}"))
    return rows


def _read_json(path: Path, text: str) -> list[Row]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # one object per line in a .json file: read it as JSON Lines
            return _read_jsonl(path, text)
        raise UserError(f"{path}:{err.lineno}: malformed JSON ({err.msg} at column {err.colno})") from None
    if isinstance(value, dict) and len(value) == 1 and isinstance(next(iter(value.values())), list):
        value = next(iter(value.values()))  # {"train": [...]} or {"data": [...]}
    if not isinstance(value, list):
        raise UserError(f"{path}: a JSON data file must hold a list of rows")
    return [_as_row(item, f"{path}:row {i + 1}") for i, item in enumerate(value)]


def _read_csv(path: Path, text: str) -> list[Row]:
    reader = csv.DictReader(text.splitlines())
    rows = []
    for record in reader:
        if None in record:
            raise UserError(f"{path}:{reader.line_num}: more values than header columns")
        rows.append(Row(dict(record), f"{path}:{reader.line_num}"))
    return rows


def _read_parquet(path: Path) -> list[Row]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises ArrowInvalid, OSError, ...
        raise UserError(f"{path}: not a readable Parquet file ({err})") from None
    return [Row(record, f"{path}:row {i + 1}") for i, record in enumerate(table.to_pylist())]


def _read_saved_dataset(path: Path) -> list[Row]:
    from datasets import Dataset, DatasetDict, load_from_disk

    try:
        loaded = load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as err:
        raise UserError(f"{path}: not a dataset folder saved with save_to_disk ({err})") from None
    if isinstance(loaded, DatasetDict):
        if "train" not in loaded:
            raise UserError(f"{path}: a DatasetDict needs a 'train' split (has {', '.join(loaded)})")
        loaded = loaded["train"]
    assert isinstance(loaded, Dataset)
    return [Row(record, f"{path}:row {i + 1}") for i, record in enumerate(loaded)]


def file_fingerprint(paths: list[str]) -> str:
    """Identifies the data's content for the tokenisation cache: path, size and mtime of each file."""
    parts = []
    for raw in paths:
        path = Path(raw)
        require(path)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            stat = file.stat()
            parts.append(f"{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}")
    return "\n".join(parts)
