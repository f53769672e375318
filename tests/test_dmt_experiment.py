"""experiments/dmt.py end to end on the tiny model: every strategy trains, is scored, and lands in the table."""

from __future__ import annotations

import json

from experiments.dmt import main


def test_the_experiment_runs_every_strategy_and_writes_table_and_plot(tmp_path, tiny_model_dir):
    out = tmp_path / "dmt"
    results = main(["--quick", "--model", str(tiny_model_dir), "--output-dir", str(out), "--k", "1", "1/4",
                    "--max-new-tokens", "4"])
    strategies = ["base", "multi-task", "sequential", "mixed sequential", "DMT k=1", "DMT k=1/4"]
    assert [k for k in results if not k.startswith("_")] == strategies
    table = (out / "table.md").read_text().splitlines()
    assert table[0].startswith("| strategy | math") and [row.split(" | ")[0][2:] for row in table[2:]] == strategies
    assert (out / "dmt.png").stat().st_size > 10_000
    # DMT's second stage: all 32 general rows plus k of the 32 math and 32 code rows, from the shared stage one
    used = {s["path"].rsplit("/", 1)[-1]: s["used"] for s in results["DMT k=1/4"]["stages"][0]["sources"]}
    assert used == {"general.jsonl": 32, "math.jsonl": 8, "code.jsonl": 8}
    plan = json.loads((out / "DMT-k1_4" / "pipeline.json").read_text())
    assert plan["stages"][0]["model"] == str((out / "mixed-sequential" / "01-specialists" / "final").resolve())
    assert len(results["sequential"]["stages"]) == 3  # forgetting is visible stage by stage
