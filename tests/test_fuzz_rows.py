"""Damaged data files of every kind give training rows or a one-line error, never a traceback or a hang
(tests/fuzz_rows.py; `python -m tests.fuzz_rows --cases 2000` runs more)."""

from __future__ import annotations

import pytest

from tests.conftest import CHATML, write_jsonl
from tests.fuzz_rows import run_case

CASES = 160


def test_seeded_fuzz_cases_give_rows_or_one_line_errors(tmp_path, tokenizer):
    outcomes = [run_case(seed, tmp_path, tokenizer, CHATML) for seed in range(CASES)]
    assert {"rows", "error"} == set(outcomes)  # both kinds of outcome occur: the damage is neither nil nor total


@pytest.mark.parametrize("content", [b'{"prompt": "a", "completion": "b"}\n' + b"[" * 100_000 + b"]" * 100_000,
                                     b'{"messages": [{"role": {"x": 1}, "content": "a"}]}\n',
                                     b'\xef\xbb\xbf{"prompt": "caf\xc3", "completion": "b"}\n'])
def test_the_command_line_answers_damaged_files_in_one_line(tmp_path, tiny_model_dir, capsys, content):
    from alignkit.cli import main

    data = tmp_path / "rows.jsonl"
    write_jsonl(data, [])
    data.write_bytes(content)
    code = main(["sft", "--model", str(tiny_model_dir), "--data", str(data), "--output-dir", str(tmp_path / "out"),
                 "--max-steps", "1"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"alignkit: error: {data}:"), err
