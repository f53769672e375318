"""`num_processes: N`: a run on one machine re-starts itself under torch's own launcher with N processes.

Nothing here spawns or coordinates processes: the command line becomes
`python -m torch.distributed.run --standalone --nproc_per_node N -m alignkit KIND --config RESOLVED.yaml`, the
same as typing it, and the processes it starts see a launcher's environment (LOCAL_RANK) and train.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from alignkit.config import to_dict
from alignkit.errors import RunError
from alignkit.log import log
from alignkit.training import threads
from alignkit.training.run_folder import check_output_dir, release_run_folder


def wants_relaunch(cfg) -> bool:
    """More processes asked for, and this one was not started by a launcher (torchrun, accelerate launch)."""
    return cfg.num_processes > 1 and "LOCAL_RANK" not in os.environ


def launch_command(kind: str, config_path: Path, processes: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
            "-m", "alignkit", kind, "--config", str(config_path)]


def relaunch(cfg, kind: str) -> dict:
    """Run this config in `cfg.num_processes` processes and return the summary the main one wrote.

    The output folder is fixed here (a default one is named once, not once per process) and checked before
    anything starts. Each process gets an equal share of this machine's cores unless OMP_NUM_THREADS is set
    (torch's launcher would otherwise give each process one thread); see training/threads.py."""
    out = check_output_dir(cfg, kind)
    release_run_folder(out)  # checked free; the main process of the launch takes the lock for the run's life
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env:  # the processes refine it by the runs alive (training/threads.py)
        env.update(OMP_NUM_THREADS=str(max(1, threads.cores() // cfg.num_processes)), **{threads.OURS: "1"})
    with tempfile.TemporaryDirectory(prefix="alignkit-launch-") as folder:
        config_path = Path(folder) / "config.yaml"
        values = to_dict(dataclasses.replace(cfg, output_dir=str(out)))
        config_path.write_text(yaml.safe_dump(values, sort_keys=False), encoding="utf-8")
        command = launch_command(kind, config_path, cfg.num_processes)
        log(f"starting {cfg.num_processes} processes: {' '.join(command)}")
        done = subprocess.run(command, env=env)
    if done.returncode != 0:
        raise RunError(f"the {cfg.num_processes} processes under torch.distributed.run stopped with exit code "
                       f"{done.returncode}; their messages are above")
    return json.loads((out / "summary.json").read_text())
