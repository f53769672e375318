"""The DMT experiment's synthetic data: every training answer passes its own scorer, and splits are seeded."""

from __future__ import annotations

import random

import pytest

from alignkit.eval.abilities import score_code, score_general, score_math
from experiments.dmt_data import MAKERS, make_split, write_all

SCORERS = {"math": lambda row: score_math(row["completion"], row["answer"]),
           "code": lambda row: score_code(row["completion"], row["tests"]),
           "general": lambda row: score_general(row["completion"], row["checks"])}


@pytest.mark.parametrize("ability", list(MAKERS))
def test_every_reference_answer_passes_its_scorer(ability):
    rng = random.Random(0)
    rows = [MAKERS[ability](rng) for _ in range(40 if ability == "code" else 300)]
    failures = [(row, SCORERS[ability](row)[1]) for row in rows if not SCORERS[ability](row)[0]]
    assert not failures


def test_splits_are_seeded_and_eval_prompts_differ_from_training_prompts(tmp_path):
    assert make_split("math", 20, 0, True) == make_split("math", 20, 0, True)
    assert make_split("math", 20, 0, True) != make_split("math", 20, 1, True)
    paths = write_all(tmp_path, 50, 20, seed=0)
    assert sorted(paths) == ["code", "eval_code", "eval_general", "eval_math", "general", "math"]
    for ability in MAKERS:
        train = {row["prompt"] for row in make_split(ability, 200, 0, True)}
        held_out = make_split(ability, 20, 0, False)
        assert not any(row["prompt"] in train for row in held_out)


def test_general_evaluation_takes_every_kind_of_constraint_in_turn_each_prompt_once():
    rows = make_split("general", 24, 0, False)
    kinds = [row["checks"][0]["type"] for row in rows]
    assert sorted(set(kinds)) == ["bullets", "include", "json", "max_words", "no_comma", "uppercase"]
    assert all(kinds.count(kind) == 4 for kind in set(kinds))
    assert len({row["prompt"] for row in rows}) == 24
