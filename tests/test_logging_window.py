"""A metrics row with logging_steps > 1 describes all its steps: losses and DPO metrics averaged, counts summed."""

from __future__ import annotations

import json

import pytest

from alignkit.api import make_dpo_config, make_sft_config
from alignkit.recipes import dpo, sft
from alignkit.training.metrics import Window
from tests.conftest import write_jsonl


def rows_of(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_window_weights_and_leaves_skipped_steps_out_of_the_averages():
    window = Window()
    window.add({"loss": 2.0}, 10, {"tokens": 10}, 1.0, True)
    window.add({"loss": float("nan")}, 5, {"tokens": 5}, 1.0, False)
    window.add({"loss": 1.0}, 30, {"tokens": 30}, 1.0, True)
    assert window.row() == {"loss": pytest.approx(1.25), "tokens": 45, "tokens_per_s": 15.0, "skipped": True}
    empty = Window()
    empty.add({"loss": float("nan")}, 5, {"tokens": 5}, 1.0, False)
    assert empty.row()["loss"] is None


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_a_row_every_two_steps_averages_the_two_steps(tmp_path, tiny_model_dir, method):
    if method == "sft":
        data = [{"prompt": f"Say {i}.", "completion": "x " * (i + 1)} for i in range(8)]
        make, run, keys = make_sft_config, sft.run, ["loss"]
    else:
        data = [{"prompt": f"Q{i}", "chosen": "yes " * (i + 1), "rejected": f"no {i}"} for i in range(8)]
        make, run, keys = make_dpo_config, dpo.run, ["loss", "rewards/margins", "rewards/accuracies", "logps/chosen"]
    path = write_jsonl(tmp_path / "rows.jsonl", data)
    common = {"model": str(tiny_model_dir), "data": [str(path)], "dtype": "fp32", "max_steps": 4, "batch_size": 2,
              "save_steps": 0, "lr": 1e-3}
    run(make(common, output_dir=str(tmp_path / "every"), logging_steps=1))
    run(make(common, output_dir=str(tmp_path / "pairs"), logging_steps=2))
    every, pairs = rows_of(tmp_path / "every"), rows_of(tmp_path / "pairs")
    assert [r["step"] for r in pairs] == [2, 4]
    weight = "tokens" if method == "sft" else "pairs"
    for row, (a, b) in zip(pairs, [every[0:2], every[2:4]], strict=True):
        assert row["tokens"] == a["tokens"] + b["tokens"]
        for key in keys:
            expected = (a[key] * a[weight] + b[key] * b[weight]) / (a[weight] + b[weight])
            assert row[key] == pytest.approx(expected, abs=1e-5), key
        assert row["lr"] == b["lr"] and row["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
