"""Reliability: bad rows, atomic checkpoints, disk errors, NaN steps, signals, and resume after SIGKILL."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alignkit.api import make_dpo_config, make_sft_config
from alignkit.cli import main
from alignkit.errors import RunError
from alignkit.recipes import dpo as dpo_recipe
from alignkit.recipes import sft as sft_recipe
from tests.conftest import write_jsonl

ROWS = [{"prompt": "Add 12 and 30.", "completion": "42"}, {"prompt": "Hello", "completion": "hello there"},
        {"prompt": "What is the capital of France?", "completion": "Paris."},
        {"prompt": "Write a short poem about the sea.", "completion": "The sea is blue."}]
PAIRS = [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": "No."} for r in ROWS]


def sft_args(tmp_path: Path, model_dir: Path, *extra: str) -> list[str]:
    data = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    return ["sft", "--model", str(model_dir), "--data", str(data), "--dtype", "fp32", "--batch-size", "1",
            "--lr", "1e-3", *extra]


# ---------------------------------------------------------------- bad input

def test_prompt_longer_than_max_length_stops_by_default_and_is_counted_with_skip(tmp_path, tiny_model_dir, capsys):
    rows = ROWS + [{"prompt": "Hello " * 80, "completion": "x"}]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    base = ["sft", "--model", str(tiny_model_dir), "--data", str(data), "--max-length", "40", "--max-steps", "1"]
    assert main([*base, "--output-dir", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert f"{data}:5: the prompt alone fills max_length=40 tokens" in err and err.count("\n") == 1
    assert main([*base, "--output-dir", str(tmp_path / "b"), "--on-bad-row", "skip"]) == 0
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["rows"]["dropped"] == 1 and summary["rows"]["used"] == 4


def test_skip_leaves_bad_rows_out_and_lists_the_first_few(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "rows.jsonl"
    lines = [json.dumps(r) for r in ROWS] + ['{"prompt": "Hi", "completion": 5}', '{"messages": []}',
                                             '{"prompt": "Hi", "completion": "ok"}']
    data.write_text("\n".join(lines) + "\n")
    args = ["sft", "--model", str(tiny_model_dir), "--data", str(data), "--max-steps", "1"]
    assert main([*args, "--output-dir", str(tmp_path / "a")]) == 2
    assert f"{data}:5: field 'completion' must be text" in capsys.readouterr().err
    assert main([*args, "--output-dir", str(tmp_path / "b"), "--on-bad-row", "skip"]) == 0
    rows = json.loads((tmp_path / "b" / "summary.json").read_text())["rows"]
    assert rows["skipped"] == 2 and rows["used"] == 5
    assert rows["skipped_examples"][0].startswith(f"{data}:5: ") and rows["skipped_examples"][1].startswith(
        f"{data}:6: ")


def test_csv_without_a_required_column(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "rows.csv"
    data.write_text("prompt,answer\nHello,world\n")
    code = main(["sft", "--model", str(tiny_model_dir), "--data", str(data), "--data-format", "prompt_completion",
                 "--output-dir", str(tmp_path / "o")])
    assert code == 2 and f"{data}:2: missing field 'completion'" in capsys.readouterr().err


# ---------------------------------------------------------------- checkpoints and disk errors

def test_a_half_written_checkpoint_is_ignored_and_resume_uses_the_last_complete_one(tmp_path, tiny_model_dir):
    from alignkit.training.checkpoint import latest_checkpoint

    assert main([*sft_args(tmp_path, tiny_model_dir, "--output-dir", str(tmp_path / "o"), "--max-steps", "4",
                           "--save-steps", "2")]) == 0
    checkpoints = tmp_path / "o" / "checkpoints"
    # What a crash during the step-6 save leaves: a staging folder, and a step folder with no state.json.
    (checkpoints / ".tmp-step-6" / "model").mkdir(parents=True)
    (checkpoints / "step-6").mkdir()
    (checkpoints / "step-6" / "optimizer.pt").write_bytes(b"partial")
    assert latest_checkpoint(checkpoints) == checkpoints / "step-4"
    (checkpoints / "latest").write_text("step-6")  # even a pointer to it is not trusted
    assert latest_checkpoint(checkpoints) == checkpoints / "step-4"


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(tmp_path, tiny_model_dir, monkeypatch, capsys):
    from alignkit.training import checkpoint as checkpoint_module

    real_save, calls = checkpoint_module.torch.save, {"n": 0}

    def failing_save(obj, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # the second checkpoint's optimizer state
            raise OSError(28, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", failing_save)
    code = main([*sft_args(tmp_path, tiny_model_dir, "--output-dir", str(tmp_path / "o"), "--max-steps", "4",
                           "--save-steps", "2")])
    err = capsys.readouterr().err
    assert code == 1 and "could not save checkpoint" in err and "No space left on device" in err
    assert "step-2 is intact" in err
    checkpoints = tmp_path / "o" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-2"]
    monkeypatch.setattr(checkpoint_module.torch, "save", real_save)
    assert main([*sft_args(tmp_path, tiny_model_dir, "--output-dir", str(tmp_path / "o"), "--max-steps", "4",
                           "--save-steps", "2", "--resume")]) == 0


# ---------------------------------------------------------------- non-finite steps

def test_a_nan_step_is_skipped_and_too_many_stop_the_run(tmp_path, tiny_model_dir, monkeypatch, capsys):
    real_loss, calls = sft_recipe.mean_nll, {"n": 0}

    def sometimes_nan(logps, num_tokens):
        calls["n"] += 1
        loss = real_loss(logps, num_tokens)
        return loss * float("nan") if calls["n"] in poisoned else loss

    monkeypatch.setattr(sft_recipe, "mean_nll", sometimes_nan)
    poisoned = {2}
    assert main([*sft_args(tmp_path, tiny_model_dir, "--output-dir", str(tmp_path / "a"), "--max-steps", "4")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["grad_norm"] is None and rows[1]["skipped"] is True  # NaN is written as null
    assert all("skipped" not in r and r["grad_norm"] is not None for r in rows[:1] + rows[2:])
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["skipped_steps"] == 1

    calls["n"] = 0
    poisoned = set(range(3, 100))
    code = main([*sft_args(tmp_path, tiny_model_dir, "--output-dir", str(tmp_path / "b"), "--max-steps", "8",
                           "--max-bad-steps", "3", "--save-steps", "1")])
    err = capsys.readouterr().err
    assert code == 1 and "NaN/Inf for 3 steps in a row (last at step 5)" in err
    checkpoints = tmp_path / "b" / "checkpoints"
    assert not (tmp_path / "b" / "final").exists()
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-1", "step-2"]
    assert (checkpoints / "latest").read_text() == "step-2"  # the last good step


def test_a_skipped_step_leaves_the_weights_unchanged(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(sft_recipe, "mean_nll", lambda logps, n: logps.sum() * float("nan"))
    cfg = make_sft_config(model=str(tiny_model_dir), data=[str(write_jsonl(tmp_path / "r.jsonl", ROWS))],
                          output_dir=str(tmp_path / "o"), max_steps=2, dtype="fp32", save_steps=0)
    _, model, _ = sft_recipe.train(cfg)
    before = load_file(tiny_model_dir / "model.safetensors")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# ---------------------------------------------------------------- signals and SIGKILL

def spawn(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "alignkit", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert process.poll() is None, process.stderr.read()
        assert time.time() < deadline
        time.sleep(0.02)


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_finishes_the_step_saves_and_says_how_to_resume(tmp_path, tiny_model_dir, signum, code):
    args = sft_args(tmp_path, tiny_model_dir, "--output-dir", str(tmp_path / "o"), "--max-steps", "5000",
                    "--save-steps", "0")
    process = spawn(args)
    wait_for(tmp_path / "o" / "metrics.jsonl", process)
    time.sleep(0.5)
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == code, err
    assert "--resume" in err.splitlines()[-1]
    state = json.loads((tmp_path / "o" / "checkpoints" / (tmp_path / "o" / "checkpoints" / "latest").read_text()
                        / "state.json").read_text())
    assert 0 < state["step"] < 5000


def test_sigkill_at_random_moments_then_resume_gives_the_uninterrupted_weights(tmp_path, tiny_model_dir):
    common = ["--max-steps", "240", "--save-steps", "7", "--grad-accum", "2", "--lora", "--lora-dropout", "0.1",
              "--save-total-limit", "2"]
    straight = spawn(sft_args(tmp_path, tiny_model_dir, "--output-dir", str(tmp_path / "straight"), *common))
    assert straight.wait(timeout=300) == 0, straight.stderr.read()
    rng = random.Random(os.getpid())
    out = tmp_path / "killed"
    kills = 0
    for attempt in range(4):
        process = spawn(sft_args(tmp_path, tiny_model_dir, "--output-dir", str(out), *common,
                                 *(["--resume"] if attempt else [])))
        wait_for(out / "checkpoints" / "latest", process) if attempt == 0 else time.sleep(2.5)
        time.sleep(rng.uniform(0.0, 1.0))
        if process.poll() is None:
            process.kill()
            kills += 1
        process.wait(timeout=60)
    final = spawn(sft_args(tmp_path, tiny_model_dir, "--output-dir", str(out), *common, "--resume"))
    assert final.wait(timeout=300) == 0, final.stderr.read()
    assert kills >= 1
    a = load_file(tmp_path / "straight" / "final" / "adapter_model.safetensors")
    b = load_file(out / "final" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = [[json.loads(x)["loss"] for x in (d / "metrics.jsonl").read_text().splitlines()]
              for d in (tmp_path / "straight", out)]
    assert losses[0] == losses[1]


# ---------------------------------------------------------------- DPO resume

def test_dpo_resume_gives_the_same_losses_and_weights(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "prefs.jsonl", PAIRS)
    common = {"model": str(tiny_model_dir), "data": [str(data)], "dtype": "fp32", "batch_size": 1, "grad_accum": 2,
              "max_steps": 6, "save_steps": 3, "lr": 1e-3, "lora": True, "lora_dropout": 0.1}
    dpo_recipe.run(make_dpo_config(common | {"output_dir": str(tmp_path / "a")}))
    dpo_recipe.run(make_dpo_config(common | {"output_dir": str(tmp_path / "b")}))
    checkpoints = tmp_path / "b" / "checkpoints"
    import shutil

    shutil.rmtree(checkpoints / "step-6")
    (checkpoints / "latest").write_text("step-3")
    dpo_recipe.run(make_dpo_config(common | {"output_dir": str(tmp_path / "b"), "resume": True}))
    rows = [[json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
            for d in ("a", "b")]
    assert [r["loss"] for r in rows[0]] == [r["loss"] for r in rows[1]] and len(rows[1]) == 6
    assert [r["rewards/margins"] for r in rows[0]] == [r["rewards/margins"] for r in rows[1]]
    a, b = (load_file(tmp_path / d / "final" / "adapter_model.safetensors") for d in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_run_error_is_a_runtime_error():
    assert issubclass(RunError, RuntimeError)
