"""Scale-out through accelerate: 2 CPU processes (torchrun, gloo) follow the 1-process trajectory."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from tests.conftest import write_jsonl

# 17 rows, global batches of 4: each epoch ends with a 1-row global batch, so in that step one process has no
# row and runs a filler pass of weight 0 (`training.run.step_stream`); 5 steps of 2 micro-batches cross an epoch.
PAIRS = [(a, b) for a in range(10, 18) for b in range(20, 22)] + [(30, 40)]


def run(args: list[str], processes: int) -> None:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                str(processes)] if processes > 1 else [sys.executable]
    done = subprocess.run([*launcher, "-m", "alignkit", *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def metrics(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("mode", ["sft", "dpo"])
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, tiny_model_dir, mode):
    if mode == "sft":
        rows = [{"prompt": f"Add {a} and {b}.", "completion": f"The answer is {a + b}."} for a, b in PAIRS]
        extra = ["--lr", "1e-3"]
    else:
        rows = [{"prompt": f"Add {a} and {b}.", "chosen": f"The answer is {a + b}.", "rejected": f"It is {a + b + 1}."}
                for a, b in PAIRS]
        extra = ["--lr", "1e-2", "--lora", "--lora-dropout", "0"]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    common = [mode, "--model", str(tiny_model_dir), "--data", str(data), "--max-steps", "5", "--dtype", "fp32",
              "--save-steps", "0", "--grad-accum", "2", *extra]
    run([*common, "--output-dir", str(tmp_path / "one"), "--batch-size", "4"], processes=1)
    run([*common, "--output-dir", str(tmp_path / "two"), "--batch-size", "2"], processes=2)
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert len(one) == len(two) == 5
    keys = ["loss", "tokens"] + (["rewards/margins", "rewards/accuracies", "pairs"] if mode == "dpo" else [])
    for a, b in zip(one, two, strict=True):
        for key in keys:
            assert a[key] == pytest.approx(b[key], abs=1e-4), key
    weights = "adapter_model.safetensors" if mode == "dpo" else "model.safetensors"
    a, b = (load_file(tmp_path / d / "final" / weights) for d in ("one", "two"))
    # float sums in another order (all-reduce), amplified a little by Adam over 5 steps: 1.3e-5 measured
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


def test_two_processes_resume_to_the_uninterrupted_trajectory(tmp_path, tiny_model_dir):
    """Stopped after step 2 and resumed to step 4, each process continues from its own data position and RNG
    state (LoRA dropout draws different masks on each process), so the losses equal an uninterrupted run's."""
    rows = [{"prompt": f"Add {a} and {b}.", "completion": f"The answer is {a + b}."} for a, b in PAIRS]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    common = ["sft", "--model", str(tiny_model_dir), "--data", str(data), "--dtype", "fp32", "--lr", "1e-3",
              "--batch-size", "2", "--grad-accum", "2", "--lora", "--lora-dropout", "0.3", "--save-steps", "2",
              "--lr-scheduler", "constant"]
    run([*common, "--output-dir", str(tmp_path / "whole"), "--max-steps", "4"], processes=2)
    run([*common, "--output-dir", str(tmp_path / "parts"), "--max-steps", "2"], processes=2)
    run([*common, "--output-dir", str(tmp_path / "parts"), "--max-steps", "4", "--resume"], processes=2)
    whole, parts = metrics(tmp_path / "whole"), metrics(tmp_path / "parts")
    assert [r["step"] for r in parts] == [1, 2, 3, 4]
    for a, b in zip(whole, parts, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
