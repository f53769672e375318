"""Data mixtures: exact counts for a seed, reproducible draws, clear errors, and what a run reports per source."""

from __future__ import annotations

import json

import pytest

from alignkit.api import make_dpo_config, make_sft_config
from alignkit.cli import main
from alignkit.data.mixture import Source, mix, normalise_entries, planned_counts, sources_of
from alignkit.errors import UserError
from alignkit.recipes import dpo as dpo_recipe
from alignkit.recipes import sft as sft_recipe
from tests.conftest import write_jsonl


def test_entries_keep_plain_paths_and_parse_amounts_from_yaml_or_flags():
    entries = normalise_entries(["a.jsonl", "b.jsonl@count=5", "c.jsonl@fraction=1/4,replace=true",
                                 {"path": "d.jsonl", "weight": 2}], "cfg")
    assert entries == ["a.jsonl", {"path": "b.jsonl", "count": 5},
                       {"path": "c.jsonl", "fraction": 0.25, "replace": True}, {"path": "d.jsonl", "weight": 2.0}]
    assert [s.describe() for s in sources_of(entries)] == ["all rows", "count 5", "fraction 0.25, with replacement",
                                                          "weight 2.0"]


@pytest.mark.parametrize("entry, message", [
    ({"path": "a.jsonl", "count": 3, "fraction": 0.5}, "give one of count, fraction or weight, not count and fraction"),
    ({"path": "a.jsonl", "cnt": 3}, "unknown key 'cnt'"),
    ({"count": 3}, "'path' is required"),
    ("a.jsonl@count=2.5", "'count' must be an integer"),
    ("a.jsonl@fraction=1.5", "'fraction' must be in [0, 1]"),
    ("a.jsonl@weight=0", "'weight' must be > 0"),
    ("a.jsonl@count=5,fraction", "should be KEY=VALUE"),
])
def test_bad_entries_name_the_position_and_the_field(entry, message):
    with pytest.raises(UserError) as err:
        normalise_entries(["ok.jsonl", entry], "plan.yaml")
    assert str(err.value).startswith("plan.yaml: data[1]: ")
    assert message in str(err.value)


def test_planned_counts_are_exact():
    sources = [Source("a", count=7), Source("b", fraction=0.25), Source("c"), Source("d", weight=1),
               Source("e", weight=2), Source("f", weight=2)]
    # weights 1:2:2 of 11 rows: 2.2, 4.4, 4.4 → 2, 5, 4 by largest remainder (ties to the earlier source)
    assert planned_counts(sources, [10, 10, 3, 100, 100, 100], total=11) == [7, 3, 3, 2, 5, 4]


def test_asking_for_more_rows_than_a_source_holds_needs_replace():
    with pytest.raises(UserError, match=r"data\[0\] \(a\): count 5 asks for 5 rows but it has 3"):
        planned_counts([Source("a", count=5)], [3], 0)
    with pytest.raises(UserError, match="set 'mix_total'"):
        planned_counts([Source("a", weight=1)], [3], 0)
    rows, _ = mix([["x", "y", "z"]], [Source("a", count=7, replace=True)], 0, seed=0)
    assert sorted(rows) == sorted(["x", "y", "z"] * 2 + [rows[-1]]) and len(rows) == 7


def test_draws_are_seeded_and_one_source_does_not_move_another():
    a, b = list(range(100)), list(range(100, 200))
    first, _ = mix([a, b], [Source("a", count=10), Source("b", fraction=0.1)], 0, seed=3)
    again, _ = mix([a, b], [Source("a", count=10), Source("b", fraction=0.1)], 0, seed=3)
    other, _ = mix([a, b], [Source("a", count=10), Source("b", fraction=0.1)], 0, seed=4)
    resized, _ = mix([a, b], [Source("a", count=10), Source("b", fraction=0.3)], 0, seed=3)
    assert first == again and first != other
    assert len(first) == 20 and len(set(first)) == 20
    assert resized[:10] == first[:10]


def rows(prefix: str, n: int) -> list[dict]:
    return [{"prompt": f"{prefix} question {i}", "completion": f"{prefix} answer {i}"} for i in range(n)]


def test_an_sft_run_uses_exactly_the_mixture_and_reports_each_source(tmp_path, tiny_model_dir):
    math_file = write_jsonl(tmp_path / "math.jsonl", rows("math", 12))
    general_file = write_jsonl(tmp_path / "general.jsonl", rows("general", 8))
    cfg = make_sft_config(model=str(tiny_model_dir), output_dir=str(tmp_path / "out"), dtype="fp32", max_steps=1,
                          save_steps=0, data=[f"{math_file}@fraction=0.25", {"path": str(general_file), "count": 5}])
    summary = sft_recipe.run(cfg)
    used = {s["path"]: (s["available"], s["used"]) for s in summary["sources"]}
    assert used == {str(math_file): (12, 3), str(general_file): (8, 5)}
    assert summary["rows"]["used"] == 8
    assert all(s["trained_tokens"] > 0 for s in summary["sources"])
    saved = (tmp_path / "out" / "config.yaml").read_text()
    assert "fraction: 0.25" in saved and "count: 5" in saved  # the mixture is part of the resolved config


def test_a_dpo_run_takes_a_mixture_too(tmp_path, tiny_model_dir):
    pairs = [{"prompt": f"Q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(10)]
    data = write_jsonl(tmp_path / "prefs.jsonl", pairs)
    cfg = make_dpo_config(model=str(tiny_model_dir), output_dir=str(tmp_path / "out"), dtype="fp32", max_steps=1,
                          save_steps=0, data=[{"path": str(data), "weight": 1}], mix_total=4)
    summary = dpo_recipe.run(cfg)
    assert summary["sources"][0]["used"] == 4 and summary["rows"]["used"] == 4


def test_the_command_line_takes_amounts_and_refuses_bad_ones_in_one_line(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path / "rows.jsonl", rows("r", 6))
    common = ["sft", "--model", str(tiny_model_dir), "--dtype", "fp32", "--max-steps", "1", "--save-steps", "0"]
    assert main([*common, "--data", f"{data}@count=9", "--output-dir", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "count 9 asks for 9 rows but it has 6 usable rows" in err
    assert not (tmp_path / "a").exists()  # refused before anything was written
    assert main([*common, "--data", f"{data}@count=2", "--output-dir", str(tmp_path / "b")]) == 0
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["sources"][0]["used"] == 2


def test_inserting_a_source_before_another_leaves_its_rows_alone():
    a, b = list(range(100)), list(range(100, 200))
    alone, _ = mix([b], [Source("b", count=10)], 0, seed=1)
    after_a, _ = mix([a, b], [Source("a", count=5), Source("b", count=10)], 0, seed=1)
    assert after_a[5:] == alone


def test_paths_with_at_signs_and_fractions_that_cannot_be_numbers():
    assert normalise_entries(["runs/user@host/a.jsonl", "x@y/b.jsonl@count=2"], "cfg") == [
        "runs/user@host/a.jsonl", {"path": "x@y/b.jsonl", "count": 2}]
    with pytest.raises(UserError, match=r"'fraction' must be a number, got '1/0'"):
        normalise_entries(["a.jsonl@fraction=1/0"], "cfg")


def test_weights_and_mix_total_are_checked_when_the_config_is_read(tmp_path):
    with pytest.raises(UserError, match="set 'mix_total'"):
        make_sft_config(data=["a.jsonl@weight=1"])
    with pytest.raises(UserError, match="no source has one"):
        make_sft_config(data=["a.jsonl"], mix_total=10)


def test_yaml_on_and_off_read_as_booleans_still_mean_on_and_off(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("data: [a.jsonl]\nactivation_checkpointing: on\n")
    assert make_sft_config(str(config)).activation_checkpointing == "on"
    config.write_text("data: [a.jsonl]\nactivation_checkpointing: off\n")
    assert make_sft_config(str(config)).activation_checkpointing == "off"
