"""experiments/forgetting.py end to end on the tiny model, and its data split and paired statistics."""

from __future__ import annotations

import gzip
import json

import pytest

from experiments.forgetting import kind_of, main, paired, problem_subset
from experiments.sharegpt import records
from tests.test_humaneval import PROBLEMS


def conversation(human: str, gpt: str) -> dict:
    return {"id": human[:8], "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]}


def test_conversations_are_told_apart_by_python_code_in_a_fence():
    assert kind_of(conversation("Tell me about rivers.", "Rivers flow downhill.")) == "general"
    assert kind_of(conversation("Sort a list", "```python\nsorted(xs)\n```")) == "code"
    assert kind_of(conversation("Sort a list", "```\ndef f(xs):\n    return sorted(xs)\n```")) == "code"
    assert kind_of(conversation("A shell loop?", "```bash\nfor f in *; do echo $f; done\n```")) is None
    assert kind_of(conversation("What does `def f():` mean?", "It defines f.")) is None


def test_the_cut_off_sharegpt_list_is_read_up_to_its_last_complete_record(tmp_path):
    rows = [conversation(f"question {i}", f"answer {i}") for i in range(3)]
    single = {"id": "x", "conversations": [{"from": "human", "value": "alone"}]}
    text = json.dumps([rows[0], single, rows[1], rows[2]], indent=1)
    path = tmp_path / "sharegpt.json"
    path.write_text(text[: text.rindex("answer 2")])  # cut inside the last record, as the wheel's file is
    assert [r["id"] for r in records(path)] == ["question", "question"]
    assert [r["conversations"][0]["value"] for r in records(path)] == ["question 0", "question 1"]


def test_paired_change_counts_discordant_problems_and_gives_mcnemars_exact_p():
    base = {"pass@1": 0.5, "passed": {"a": True, "b": True, "c": False, "d": False}}
    other = {"pass@1": 0.5, "passed": {"a": False, "b": True, "c": True, "d": False}}
    assert paired(base, other) == {"difference": 0.0, "newly_failed": 1, "newly_passed": 1, "mcnemar_p": 1.0}
    tasks = {str(i): False for i in range(5)}
    result = paired({"pass@1": 0.0, "passed": tasks}, {"pass@1": 1.0, "passed": dict.fromkeys(tasks, True)})
    assert result["newly_passed"] == 5 and result["mcnemar_p"] == pytest.approx(2 / 2 ** 5)


def test_the_problem_subset_is_seeded_in_file_order_and_zero_means_all():
    problems = [{"task_id": str(i)} for i in range(20)]
    chosen = problem_subset(problems, 5, seed=0)
    assert chosen == problem_subset(problems, 5, seed=0) and chosen != problem_subset(problems, 5, seed=1)
    assert [int(p["task_id"]) for p in chosen] == sorted(int(p["task_id"]) for p in chosen)
    assert problem_subset(problems, 0, seed=0) == problems == problem_subset(problems, 50, seed=0)


def test_the_experiment_trains_scores_compares_and_reuses_its_results(tmp_path, tiny_model_dir):
    general = [conversation(f"Tell me about river number {i}.", f"River {i} is long and green.") for i in range(12)]
    code = [conversation(f"Write add{i}.", f"```python\ndef add{i}(a, b):\n    return a + b\n```") for i in range(6)]
    sharegpt = tmp_path / "sharegpt.json"
    sharegpt.write_text(json.dumps(general + code))
    data = tmp_path / "HumanEval.jsonl.gz"
    with gzip.open(data, "wt") as f:
        f.writelines(json.dumps(p) + "\n" for p in PROBLEMS)
    out = tmp_path / "forgetting"
    argv = ["--model", str(tiny_model_dir), "--output-dir", str(out), "--general", "8", "--k", "0.5",
            "--problems", "2", "--max-new-tokens", "4", "--batch-size", "4", "--sharegpt", str(sharegpt),
            "--humaneval-data", str(data)]
    results = main(argv)
    assert list(results["models"]) == ["base", "general", "general + k=0.5 code"]
    assert results["_meta"]["problems"] == 2 and len(results["_meta"]["problem_ids"]) == 2
    mixed = results["models"]["general + k=0.5 code"]
    assert mixed["data"] == "8 general + 4 code" and set(mixed["passed"]) == set(results["_meta"]["problem_ids"])
    assert mixed["vs_base"] == paired(results["models"]["base"], mixed)
    assert (out / "general-k0.5code" / "final" / "adapter_config.json").is_file()
    summary = json.loads((out / "general-k0.5code" / "summary.json").read_text())
    assert summary["rows"]["used"] == 12  # 8 general + 4 code conversations
    table = (out / "table.md").read_text().splitlines()
    assert table[0].startswith("| model | SFT data | pass@1") and len(table) == 5
    stamp = (out / "general" / "final").stat().st_mtime_ns
    assert main(argv)["models"] == results["models"]  # finished trainings and scores are reused
    assert (out / "general" / "final").stat().st_mtime_ns == stamp
