"""KTO and ORPO under DDP, and KTO under FSDP (2 CPU processes, gloo), follow the 1-process trajectory at the same
global batch (KTO under DeepSpeed ZeRO: tests/test_deepspeed.py)."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from tests.conftest import write_jsonl
from tests.test_distributed import PAIRS, metrics, run

KTO_ROWS = [{"prompt": f"Add {a} and {b}.", "completion": f"The answer is {a + b + (i % 2)}.", "label": i % 2 == 0}
            for i, (a, b) in enumerate(PAIRS)]
ORPO_ROWS = [{"prompt": f"Add {a} and {b}.", "chosen": f"The answer is {a + b}.", "rejected": f"It is {a + b + 1}."}
             for a, b in PAIRS]
MODES = {"kto": (KTO_ROWS, ["kl", "rewards/chosen", "rewards/rejected", "rows"]),
         "orpo": (ORPO_ROWS, ["nll_loss", "rewards/margins", "log_odds_ratio", "pairs"])}


def assert_two_processes_match_one(tmp_path, model_dir, command: str, rows: list[dict], eval_rows: int,
                                   strategy: str, keys: list[str]) -> list[dict]:
    """One process at batch 4 against two at batch 2 (2 accumulation steps, 3 steps, eval at step 3): the same
    metrics to 1e-4 and the same final weights; returns the one-process metrics."""
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    held_out = write_jsonl(tmp_path / "eval.jsonl", rows[:eval_rows])
    common = [command, "--model", str(model_dir), "--data", str(data), "--max-steps", "3", "--dtype", "fp32",
              "--save-steps", "0", "--grad-accum", "2", "--eval-data", str(held_out), "--eval-steps", "3",
              "--lr", "1e-2", "--compile", "off"]
    run([*common, "--output-dir", str(tmp_path / "one"), "--batch-size", "4"], processes=1)
    two_processes = [*common, "--output-dir", str(tmp_path / "two"), "--batch-size", "2", "--strategy", strategy]
    if strategy == "ddp":
        run([*two_processes, "--num-processes", "2"], processes=1)
    else:
        assert "(fsdp (full shard))" in run(two_processes, processes=2)
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3, 3]
    for a, b in zip(one, two, strict=True):
        for key in ["loss", "tokens", *keys] if "loss" in a else ["eval/loss"]:
            assert (key in a) == (key in b) and a.get(key) == pytest.approx(b.get(key), abs=1e-4), key
    reference, saved = (load_file(tmp_path / d / "final" / "model.safetensors") for d in ("one", "two"))
    assert max((reference[k] - saved[k]).abs().max().item() for k in reference) < 1e-4
    return one


@pytest.mark.parametrize("command,strategy", [("kto", "ddp"), ("orpo", "ddp"), ("kto", "fsdp")])
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, tiny_model_dir, command, strategy):
    """17 rows in global batches of 4 with 2 accumulation steps: the last step of the epoch has one row, so one
    process runs only a filler pass; under KTO it still takes part in estimating the step's reference point, and
    under FSDP it runs as many scoring passes of its sharded policy and reference copy as the other process."""
    rows, keys = MODES[command]
    one = assert_two_processes_match_one(tmp_path, tiny_model_dir, command, rows, 1, strategy, keys)
    assert max(r.get("kl", 1.0) for r in one[1:3]) > 0  # the reference point is in play (KTO)


UNEVEN = [(31, 41), (32, 42)]  # 19 rows: the epoch's last global batch of 8 leaves 3 rows, 2 on one process


@pytest.mark.parametrize("command", ["kto", "dpo"])
def test_fsdp_with_uneven_shards_matches_one_process(tmp_path, tiny_model_dir, command):
    """Full KTO and DPO (the reference a sharded copy) under FSDP, where both processes hold rows but not as many:
    the last training step splits 2 rows against 1 and the 3 eval rows 2 against 1. Every forward pass gathers
    parameters, so each process must run its reference and policy passes in the same order and number as the
    other (one row per pass, counts evened out), or the run hangs or mixes the two models' weights."""
    pairs = [*PAIRS, *UNEVEN]
    rows = ([{"prompt": f"Add {a} and {b}.", "completion": f"The answer is {a + b + (i % 2)}.", "label": i % 2 == 0}
             for i, (a, b) in enumerate(pairs)] if command == "kto" else
            [{"prompt": f"Add {a} and {b}.", "chosen": f"The answer is {a + b}.", "rejected": f"It is {a + b + 1}."}
             for a, b in pairs])
    keys = MODES["kto"][1] if command == "kto" else ["rewards/margins", "rewards/accuracies", "pairs"]
    assert_two_processes_match_one(tmp_path, tiny_model_dir, command, rows, 3, "fsdp", keys)
