"""Scale-out through accelerate: 2 CPU processes (torchrun, gloo) follow the 1-process trajectory."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import write_jsonl

# 17 rows, global batches of 4: each epoch ends with a 1-row global batch, so in that step one process has no
# row and runs a filler pass of weight 0 (`Backend.equal_passes`); 5 steps of 2 micro-batches cross an epoch.
PAIRS = [(a, b) for a in range(10, 18) for b in range(20, 22)] + [(30, 40)]


def run(args: list[str], processes: int) -> str:
    """Run alignkit under torchrun with `processes` processes (1: plainly); returns its stderr."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                str(processes)] if processes > 1 else [sys.executable]
    done = subprocess.run([*launcher, "-m", "alignkit", *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


def metrics(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


SFT_ROWS = [{"prompt": f"Add {a} and {b}.", "completion": f"The answer is {a + b}."} for a, b in PAIRS]
DPO_ROWS = [{"prompt": f"Add {a} and {b}.", "chosen": f"The answer is {a + b}.", "rejected": f"It is {a + b + 1}."}
            for a, b in PAIRS]
# (command, rows, flags, strategies): full SFT; DPO LoRA (the reference is the base under the adapter); full DPO
# (the reference is a frozen copy: what FSDP does to it is new, under DDP it is an ordinary module)
MODES = {"sft": ("sft", SFT_ROWS, ["--lr", "1e-3"], ("ddp", "fsdp")),
         "dpo-lora": ("dpo", DPO_ROWS, ["--lr", "1e-2", "--lora", "--lora-dropout", "0"], ("ddp", "fsdp")),
         "dpo-full": ("dpo", DPO_ROWS, ["--lr", "1e-3"], ("fsdp",))}


@pytest.mark.parametrize("mode", list(MODES))
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, tiny_model_dir, mode):
    """DDP and FSDP (full shard, 2 CPU processes over gloo) against one process with the same global batch.

    The DDP runs start with `--num-processes 2`; the FSDP runs under torchrun with `--strategy fsdp`, or (DPO
    with LoRA) under `accelerate launch --config_file configs/accelerate/fsdp.yaml`."""
    command, rows, extra, strategies = MODES[mode]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    # one eval row: the second process has none, yet evaluating (steps 2, 4, 5) must keep them in step
    held_out = write_jsonl(tmp_path / "eval.jsonl", rows[:1])
    common = [command, "--model", str(tiny_model_dir), "--data", str(data), "--max-steps", "5", "--dtype", "fp32",
              "--save-steps", "0", "--grad-accum", "2", "--eval-data", str(held_out), "--eval-steps", "2", *extra]
    run([*common, "--output-dir", str(tmp_path / "one"), "--batch-size", "4"], processes=1)
    for strategy in strategies:
        args = [*common, "--output-dir", str(tmp_path / strategy), "--batch-size", "2", "--strategy", strategy]
        if strategy == "ddp":  # through the convenience flag, which re-runs alignkit under torch's launcher
            log = run([*args, "--num-processes", "2"], processes=1)
            assert "-m torch.distributed.run --standalone --nproc_per_node 2 -m alignkit" in log
            assert "global batch 2 x 2 processes x 2 accumulation (ddp)" in log
        elif mode == "dpo-lora":  # through accelerate launch and the shipped config, which selects FSDP
            config = Path(__file__).parent.parent / "configs" / "accelerate" / "fsdp.yaml"
            launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                        "--num_processes", "2", "-m", "alignkit"]
            done = subprocess.run([*launcher, *args[:-2]], capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stderr[-3000:]
            assert "(fsdp (full shard))" in done.stderr
        else:
            assert "(fsdp (full shard))" in run(args, processes=2)
    one = metrics(tmp_path / "one")
    keys = ["loss", "tokens"] + (["rewards/margins", "rewards/accuracies", "pairs"] if command == "dpo" else [])
    weights = "adapter_model.safetensors" if "--lora" in extra else "model.safetensors"
    reference = load_file(tmp_path / "one" / "final" / weights)
    for strategy in strategies:
        two = metrics(tmp_path / strategy)
        assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 2, 3, 4, 4, 5, 5]
        for a, b in zip(one, two, strict=True):
            for key in keys if "loss" in a else ["eval/loss"]:
                assert a[key] == pytest.approx(b[key], abs=1e-4), (strategy, key)
        # final/ is a standard folder with every weight, gathered from the shards under FSDP
        saved = load_file(tmp_path / strategy / "final" / weights)
        assert sorted(saved) == sorted(reference)
        # float sums in another order (all-reduce), amplified a little by Adam over 5 steps: 1.3e-5 measured
        assert max((reference[k] - saved[k]).abs().max().item() for k in reference) < 1e-4, strategy


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_resume_to_the_uninterrupted_trajectory(tmp_path, tiny_model_dir, strategy):
    """Stopped after step 2 and resumed to step 4, each process continues from its own data position and RNG
    state (LoRA dropout draws different masks on each process), so the losses equal an uninterrupted run's.
    Under FSDP the checkpoint holds the gathered weights and optimizer state, re-sharded on resume."""
    data = write_jsonl(tmp_path / "rows.jsonl", SFT_ROWS)
    common = ["sft", "--model", str(tiny_model_dir), "--data", str(data), "--dtype", "fp32", "--lr", "1e-3",
              "--batch-size", "2", "--grad-accum", "2", "--lora", "--lora-dropout", "0.3", "--save-steps", "2",
              "--lr-scheduler", "constant", "--strategy", strategy]
    run([*common, "--output-dir", str(tmp_path / "whole"), "--max-steps", "4"], processes=2)
    run([*common, "--output-dir", str(tmp_path / "parts"), "--max-steps", "2"], processes=2)
    run([*common, "--output-dir", str(tmp_path / "parts"), "--max-steps", "4", "--resume"], processes=2)
    whole, parts = metrics(tmp_path / "whole"), metrics(tmp_path / "parts")
    assert [r["step"] for r in parts] == [1, 2, 3, 4]
    for a, b in zip(whole, parts, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)


def test_a_signal_to_one_process_stops_all_at_the_same_step_with_a_checkpoint(tmp_path, tiny_model_dir):
    """SIGTERM reaching only the second process: every process stops after the same step and the checkpoint
    they save together resumes (without the per-step agreement the first process trains on alone and hangs)."""
    import psutil

    data = write_jsonl(tmp_path / "rows.jsonl", SFT_ROWS)
    out = tmp_path / "run"
    args = ["sft", "--model", str(tiny_model_dir), "--data", str(data), "--dtype", "fp32", "--batch-size", "2",
            "--max-steps", "100000", "--save-steps", "0", "--compile", "off", "--output-dir", str(out)]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    agent = subprocess.Popen([*launcher, "-m", "alignkit", *args], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not ((out / "metrics.jsonl").is_file() and len(metrics(out)) >= 2):
            assert agent.poll() is None and time.time() < deadline, "the run did not get going"
            time.sleep(0.2)
        # the launcher's own children: a worker's helpers (inductor's compile pool) inherit RANK too
        second = next(p for p in psutil.Process(agent.pid).children() if p.environ().get("RANK") == "1")
        second.send_signal(signal.SIGTERM)
        _, stderr = agent.communicate(timeout=240)
    finally:  # on failure, leave no worker behind
        workers = psutil.Process(agent.pid).children(recursive=True) if agent.poll() is None else []
        for process in [*workers, psutil.Process(agent.pid)] if agent.poll() is None else []:
            process.kill()
    assert "stopped by SIGTERM after step" in stderr, stderr[-3000:]
    saved = int((out / "checkpoints" / "latest").read_text().strip().removeprefix("step-"))
    assert saved == metrics(out)[-1]["step"]
    resumed = [arg if arg != "100000" else str(saved + 1) for arg in args]
    run([*resumed, "--resume"], processes=2)
    assert [r["step"] for r in metrics(out)][-2:] == [saved, saved + 1]
