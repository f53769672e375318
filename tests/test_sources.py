"""Data files of every kind load with their origins; broken files give errors naming file and line."""

from __future__ import annotations

import json

import pytest

from alignkit.data.sources import read_rows
from alignkit.errors import UserError
from tests.conftest import write_jsonl

ROWS = [{"prompt": "Hello", "completion": "world"}, {"prompt": "Add 12 and 30.", "completion": "42"}]


def test_jsonl_json_csv_parquet_and_saved_dataset_give_the_same_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    write_jsonl(tmp_path / "a.jsonl", ROWS)
    (tmp_path / "a.json").write_text(json.dumps(ROWS))
    (tmp_path / "a.csv").write_text("prompt,completion\nHello,world\nAdd 12 and 30.,42\n")
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "a.parquet")
    Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    for name in ("a.jsonl", "a.json", "a.csv", "a.parquet", "saved"):
        rows = read_rows([str(tmp_path / name)])
        assert [r.fields for r in rows] == ROWS, name
    assert [r.origin for r in read_rows([str(tmp_path / "a.jsonl")])] == [f"{tmp_path}/a.jsonl:1",
                                                                           f"{tmp_path}/a.jsonl:2"]
    assert read_rows([str(tmp_path / "a.csv")])[1].origin == f"{tmp_path}/a.csv:3"


def test_several_files_are_concatenated(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", ROWS[:1])
    write_jsonl(tmp_path / "b.jsonl", ROWS[1:])
    rows = read_rows([str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")])
    assert [r.fields for r in rows] == ROWS


@pytest.mark.parametrize(("name", "content", "message"), [
    ("bad.jsonl", b'{"prompt": "a", "completion": "b"}\n{"prompt": "a",\n', "bad.jsonl:2: malformed JSON"),
    ("latin.jsonl", b'{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9"}\n', "latin.jsonl:2: not UTF-8"),
    ("empty.jsonl", b"", "empty.jsonl: file is empty"),
    ("blank.jsonl", b"\n\n", "blank.jsonl: holds no rows"),
    ("list.jsonl", b"[1, 2]\n", "list.jsonl:1: a row must be a JSON object"),
    ("rows.txt", b"hello\n", "unknown data file type '.txt'"),
    ("wide.csv", b"prompt,completion\na,b,c\n", "wide.csv:2: more values than header columns"),
])
def test_broken_files(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_rows([str(tmp_path / name)])


def test_missing_file_and_folder_that_is_not_a_dataset(tmp_path):
    with pytest.raises(UserError, match="nope.jsonl: data file not found"):
        read_rows([str(tmp_path / "nope.jsonl")])
    (tmp_path / "folder").mkdir()
    with pytest.raises(UserError, match="folder: not a dataset folder saved with save_to_disk"):
        read_rows([str(tmp_path / "folder")])
