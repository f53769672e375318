"""Training processes on one machine share its cores: threads = cores // live alignkit processes."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys

import pytest

from alignkit.errors import RunError
from alignkit.training import threads

# A training process in miniature: registers, then re-counts its share each time it reads a line.
CHILD = """
import sys, torch
from alignkit.training import threads
threads.cores = lambda: 2
threads.register()
print(torch.get_num_threads(), flush=True)
for _ in sys.stdin:
    threads.adjust(force=True)
    print(torch.get_num_threads(), flush=True)
"""


def child(env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=env)


def ask(process: subprocess.Popen) -> int:
    process.stdin.write("\n")
    process.stdin.flush()
    return int(process.stdout.readline())


def test_two_runs_on_two_cores_take_one_each_and_the_survivor_takes_both_back(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["ALIGNKIT_CACHE"] = str(tmp_path / "cache")
    first = child(env)
    second = None
    try:
        assert int(first.stdout.readline()) == 2  # alone on the machine
        second = child(env)
        assert int(second.stdout.readline()) == 1
        assert ask(first) == 1  # the earlier run gives a core up when it next counts
        second.kill()
        second.wait(timeout=30)
        assert ask(first) == 2  # and takes it back once the other is gone (its file is left, unlocked)
        assert len(list((tmp_path / "cache" / "live").glob("*.live"))) == 1  # the dead one's file was removed
    finally:
        for process in (first, second):
            if process is not None:
                process.kill()
                process.wait(timeout=30)


def test_omp_num_threads_set_by_the_user_wins_and_ours_is_adjusted(tmp_path):
    env = {**os.environ, "ALIGNKIT_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    other = tmp_path / "cache" / "live" / "1.live"
    other.parent.mkdir(parents=True)
    fd = os.open(other, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another live process; with the child, 2 on 2 cores
    try:
        assert int(child({**env, "OMP_NUM_THREADS": "2"}).communicate("")[0]) == 2  # the user's 2 stays
        assert int(child({**env, threads.OURS: "1", "OMP_NUM_THREADS": "2"}).communicate("")[0]) == 1
    finally:
        os.close(fd)


def test_the_num_processes_launch_marks_its_omp_setting_as_adjustable(monkeypatch, tmp_path):
    from alignkit.api import make_sft_config
    from alignkit.training import launch

    seen = {}

    def fake_run(command, env):
        seen.update(env)
        return subprocess.CompletedProcess(command, 1)

    monkeypatch.setattr(launch.subprocess, "run", fake_run)
    monkeypatch.setattr(threads, "cores", lambda: 8)
    cfg = make_sft_config(model="m", data=["d.jsonl"], num_processes=2, output_dir=str(tmp_path / "o"))
    for user_value, expected in ((None, ("4", "1")), ("3", ("3", None))):
        if user_value is None:
            monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        else:
            monkeypatch.setenv("OMP_NUM_THREADS", user_value)
        monkeypatch.delenv(threads.OURS, raising=False)
        seen.clear()
        with pytest.raises(RunError):  # the faked launch fails; only the environment it was given is looked at
            launch.relaunch(cfg, "sft")
        assert (seen["OMP_NUM_THREADS"], seen.get(threads.OURS)) == expected
