"""One run per output folder: a flock on RUN/run.lock, held for the run's life by its main process."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from alignkit.cli import main
from alignkit.training import run_folder as run_module
from tests.test_reliability import sft_args, spawn, wait_for


def holder_message(out: Path, pid: int) -> str:
    return f"alignkit: error: {out}: another run (pid {pid}) is using this output_dir"


def lock_is_free(out: Path) -> bool:
    """Whether a new open of the lock file (its own file description) can take the flock now."""
    fd = os.open(out / run_module.LOCK_FILE, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def test_a_second_run_stops_naming_the_first_and_a_killed_run_leaves_no_stale_lock(tmp_path, tiny_model_dir,
                                                                                    capsys):
    out = tmp_path / "o"
    first = spawn(sft_args(tmp_path, tiny_model_dir, "--output-dir", str(out), "--max-steps", "5000",
                           "--save-steps", "2"))
    try:
        wait_for(out / "checkpoints" / "latest", first)
        for extra in ([], ["--resume"], ["--overwrite"]):
            assert main([*sft_args(tmp_path, tiny_model_dir, "--output-dir", str(out), "--max-steps", "2"),
                         *extra]) == 2, extra
            err = capsys.readouterr().err
            assert err.startswith(holder_message(out, first.pid)) and err.count("\n") == 1, err
        assert first.poll() is None and (out / "metrics.jsonl").is_file()  # the first run was left alone
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    assert (out / run_module.LOCK_FILE).read_text().strip() == str(first.pid)  # what a killed run leaves
    step = json.loads((out / "checkpoints" / (out / "checkpoints" / "latest").read_text() / "state.json")
                      .read_text())["step"]
    assert main([*sft_args(tmp_path, tiny_model_dir, "--output-dir", str(out), "--max-steps", str(step + 2),
                           "--save-steps", "2", "--resume")]) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == step + 2
    assert lock_is_free(out) and not run_module._HELD  # released when the run ended, the process going on


def test_two_runs_started_together_on_a_new_folder_one_trains(tmp_path, tiny_model_dir):
    out = tmp_path / "fresh"
    args = sft_args(tmp_path, tiny_model_dir, "--output-dir", str(out), "--max-steps", "5000", "--save-steps", "0")
    both = [spawn(args), spawn(args)]
    try:
        deadline = time.time() + 180
        while all(p.poll() is None for p in both):
            assert time.time() < deadline
            time.sleep(0.1)
        loser = next(p for p in both if p.poll() is not None)
        winner = next(p for p in both if p is not loser)
        err = loser.stderr.read()
        # the loser may have found the folder missing, loaded its data, and met the lock when creating it
        assert loser.returncode == 2 and err.splitlines()[-1].startswith(holder_message(out, winner.pid)), err
        assert err.count("alignkit: error:") == 1
        assert winner.poll() is None
    finally:
        for process in both:
            process.kill()
            process.wait(timeout=60)


def test_a_two_process_run_takes_the_lock_once_and_finishes(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "ddp"
    out.mkdir()  # an existing folder: the launching process checks the lock, then its main process takes it
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = subprocess.Popen([sys.executable, "-m", "alignkit", *sft_args(
        tmp_path, tiny_model_dir, "--output-dir", str(out), "--max-steps", "60", "--save-steps", "0",
        "--num-processes", "2")], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        wait_for(out / "metrics.jsonl", launch, timeout=240)
        rank0 = int((out / run_module.PID_FILE).read_text())
        assert rank0 != launch.pid
        assert main([*sft_args(tmp_path, tiny_model_dir, "--output-dir", str(out), "--resume")]) == 2
        assert capsys.readouterr().err.startswith(holder_message(out, rank0))
        assert launch.wait(timeout=300) == 0, launch.stderr.read()
    finally:
        launch.kill()
        launch.wait(timeout=60)
    assert json.loads((out / "summary.json").read_text())["steps"] == 60 and lock_is_free(out)
