"""Per-ability scorers on hand cases: math exact match, code under unit tests (the endless loop included), checks."""

from __future__ import annotations

import pytest

from alignkit.errors import UserError
from alignkit.eval.abilities import evaluate_sets, load_tasks, score_code, score_general, score_math
from tests.conftest import write_jsonl


@pytest.mark.parametrize("reply, answer, right", [
    ("First 3 + 4 = 7, then 7 * 2 = 14. The answer is 14.", 14, True),
    ("The total is 1,200 apples.", "1200", True),
    ("So she pays 12.50 dollars.", 12.5, True),
    ("It is -3.", -3, True),
    ("The answer is 14, or maybe 15.", 14, False),  # the last number counts
    ("I do not know.", 3, False),
])
def test_math_is_exact_match_of_the_final_number(reply, answer, right):
    assert score_math(reply, answer)[0] is right


TESTS = "assert add_two(1) == 3\nassert add_two(-2) == 0"


@pytest.mark.parametrize("reply, right, reason", [
    ("def add_two(x):\n    return x + 2", True, "passed"),
    ("Here it is:\n```python\ndef add_two(x):\n    return x + 2\n```\nDone.", True, "passed"),
    ("def add_two(x):\n    return x + 3", False, "AssertionError"),
    ("def add_two(x):\n    while True:\n        pass", False, "timeout"),
    ("def add_two(x) return x", False, "SyntaxError"),
    ("def add_two(x):\n    return x\nimport sys\nsys.exit(0)", False, "exited before the tests finished"),
    ("def add_two(x):\n    return x + 2\nimport subprocess\nsubprocess.Popen(['sleep', '30'])", True, "passed"),
    ("import urllib.request\nurllib.request.urlopen('http://example.com')\ndef add_two(x):\n    return x + 2",
     False, "network access is disabled"),
])
def test_code_runs_the_unit_tests_in_a_child_with_a_time_limit(reply, right, reason):
    ok, detail = score_code(reply, TESTS, timeout=2.0)
    assert ok is right
    assert reason in detail


@pytest.mark.parametrize("reply, checks, right", [
    ("APPLES ARE RED", [{"type": "uppercase"}], True),
    ("Apples are red", [{"type": "uppercase"}], False),
    ("apples are red", [{"type": "lowercase"}, {"type": "max_words", "value": 3}], True),
    ("apples are very red", [{"type": "max_words", "value": 3}], False),
    ("- one\n- two\n* three", [{"type": "bullets", "value": 3}], True),
    ("- one\n- two", [{"type": "bullets", "value": 3}], False),
    ('{"name": "Ada"}', [{"type": "json"}], True),
    ("name: Ada", [{"type": "json"}], False),
    ("I like Paris and Rome.", [{"type": "include", "value": ["paris", "rome"]}, {"type": "no_comma"}], True),
    ("I like Paris, and Rome.", [{"type": "no_comma"}], False),
    ("Hello there. Goodbye.", [{"type": "starts_with", "value": "Hello"}, {"type": "ends_with", "value": "bye."}],
     True),
    ("It is cold", [{"type": "exclude", "value": ["cold"]}], False),
])
def test_general_checks(reply, checks, right):
    assert score_general(reply, checks)[0] is right


def test_an_evaluation_row_names_its_scorer_by_its_fields(tmp_path):
    good = write_jsonl(tmp_path / "mixed.jsonl", [{"prompt": "2+2?", "answer": 4},
                                                  {"prompt": "f", "tests": "assert True"},
                                                  {"prompt": "shout", "checks": [{"type": "uppercase"}]}])
    assert [t.scorer for t in load_tasks(good)] == ["math", "code", "general"]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "2+2?", "answer": 4}, {"prompt": "x"}])
    with pytest.raises(UserError, match=r"bad.jsonl:2: a row needs exactly one of 'answer'"):
        load_tasks(bad)
    unknown = write_jsonl(tmp_path / "unknown.jsonl", [{"prompt": "x", "checks": [{"type": "rhymes"}]}])
    with pytest.raises(UserError, match=r"unknown.jsonl:1: checks\[0\]: 'type' must be one of .*got 'rhymes'"):
        load_tasks(unknown)


def test_evaluate_sets_scores_generated_replies(tmp_path, tiny_model_dir):
    from alignkit.models.load import load_model, load_tokenizer

    model, tokenizer = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    sets = {"general": str(write_jsonl(tmp_path / "g.jsonl", [
        {"prompt": "say anything", "checks": [{"type": "max_words", "value": 10_000}]},
        {"prompt": "say nothing", "checks": [{"type": "min_words", "value": 10_000}]}]))}
    samples = tmp_path / "samples.jsonl"
    result = evaluate_sets(model, tokenizer, sets, max_new_tokens=4, samples_file=samples)
    assert result == {"general": {"score": 0.5, "right": 1, "rows": 2}}
    assert len(samples.read_text().splitlines()) == 2


@pytest.mark.parametrize("row, message", [
    ({"prompt": "p", "checks": [{"type": "max_words", "value": "ten"}]},
     "checks[0] (max_words): 'value' must be a whole number >= 0, got 'ten'"),
    ({"prompt": "p", "checks": [{"type": "uppercase"}, {"type": "include", "value": 5}]},
     "checks[1] (include): 'value' must be a word or a list of words, got 5"),
    ({"prompt": "p", "checks": [{"type": ["x"]}]}, "checks[0]: 'type' must be one of"),
    ({"prompt": "p", "answer": "yes"}, "field 'answer' must hold a number, got 'yes'"),
    ({"prompt": "p", "tests": "assert True", "timeout": "abc"}, "field 'timeout' must be seconds"),
    ({"prompt": [{"text": "hi"}], "answer": 1}, "field 'prompt' is required"),
])
def test_bad_evaluation_rows_are_one_line_errors_before_any_generation(tmp_path, row, message):
    path = write_jsonl(tmp_path / "set.jsonl", [{"prompt": "ok", "answer": 1}, row])
    with pytest.raises(UserError) as err:
        load_tasks(path)
    assert str(err.value).startswith(f"{path}:2: ") and message in str(err.value)
