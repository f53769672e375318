"""The run folder: checked before anything is loaded, locked while a run uses it, final/ written atomically."""

from __future__ import annotations

import fcntl
import functools
import os
import shutil
import time
from datetime import datetime
from pathlib import Path

from alignkit.errors import RunError, UserError
from alignkit.models.load import no_hub_lookup
from alignkit.training.checkpoint import kept_state, write_failure

RUN_FILES = ("metrics.jsonl", "summary.json", "config.yaml", "data.json", "final", "checkpoints", "tensorboard",
             "wandb", "mlruns", "tracking.json")
PID_FILE = "run.pid"
LOCK_FILE = "run.lock"
_HELD: dict[Path, int] = {}  # run folder -> the open lock file whose flock this process holds


def check_output_dir(cfg, kind: str, is_main: bool = True) -> Path:
    """The run folder, checked and, when it exists, locked by the main process; nothing else is written or
    deleted before the inputs are checked."""
    out = Path(cfg.output_dir or f"runs/{kind}-{datetime.now():%Y%m%d-%H%M%S}")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: output_dir is a file, not a folder")
    if is_main and out.is_dir():
        lock_run_folder(out)  # before the "already holds a run" check, which a live run would also trip
    holds_run = any((out / name).exists() for name in RUN_FILES)
    if holds_run and not (cfg.resume or cfg.overwrite):
        raise UserError(f"{out}: already holds a run; pass --resume to continue it or --overwrite to replace it")
    return out


def claim_output_dir(cfg, out: Path, is_main: bool) -> None:
    """Called once data, model and config have passed every check: clear an old run (--overwrite), create."""
    if not is_main:
        return
    out.mkdir(parents=True, exist_ok=True)
    lock_run_folder(out)  # a folder made since the check: two runs that both found it missing meet here
    if cfg.overwrite and not cfg.resume:
        for name in RUN_FILES:
            target = out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / PID_FILE).write_text(str(os.getpid()))  # `alignkit ui` tells a running run from a dead one by it


def lock_run_folder(out: Path) -> None:
    """Hold an exclusive flock on RUN/run.lock until `release_run_folder` or the process ends.

    The kernel drops a flock when its holder dies, however it dies, so the lock of a killed run is never stale
    and --resume of a dead run takes it at once. A run that finds it held stops with the holder's pid."""
    key = out.resolve()
    if key in _HELD:
        return
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder_pid(fd)
        os.close(fd)
        raise UserError(f"{out}: another run (pid {holder}) is using this output_dir; wait for it to end or "
                        "pick another --output-dir") from None
    pid = f"{os.getpid()}\n".encode()
    os.pwrite(fd, pid, 0)  # written before truncating, so a reader never sees the old holder's pid cut short
    os.ftruncate(fd, len(pid))
    _HELD[key] = fd


def _holder_pid(fd: int) -> str:
    """The pid the holder writes just after taking the lock; a run that meets the lock in that instant waits for
    it briefly rather than report the holder as unknown."""
    for _ in range(50):
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if holder:
            return holder
        time.sleep(0.02)
    return "unknown"


def releases_run_folder_on_error(train):
    """Decorate the loop's fit: a run that fails lets go of the folders it locked, so that a process that goes
    on (the Python API, a notebook, a pipeline) can run there again, or another process can."""
    @functools.wraps(train)
    def guarded(*args, **kwargs):
        before = set(_HELD)
        try:
            return train(*args, **kwargs)
        except BaseException:
            for key in set(_HELD) - before:
                release_run_folder(key)
            raise
    return guarded


def release_run_folder(out: Path) -> None:
    """Let another run use the folder (a finished run in a process that goes on: the Python API, pipelines)."""
    fd = _HELD.pop(out.resolve(), None)
    if fd is not None:
        os.close(fd)


def save_final(model, tokenizer, out: Path, backend) -> Path:
    """final/: written beside, then renamed into place, so a failed save never leaves half a model."""
    final, staging = out / "final", out / ".final.tmp"
    weights = backend.full_state_dict(model)  # every process takes part in gathering FSDP shards
    if backend.is_main:
        try:
            shutil.rmtree(staging, ignore_errors=True)
            unwrapped = backend.unwrap(model)
            initial = getattr(unwrapped, "initial_adapter", None)  # PiSSA / OLoRA: see models.load
            converted = {"path_initial_model_for_weight_conversion": initial} if initial else {}
            with no_hub_lookup():
                unwrapped.save_pretrained(staging, state_dict=weights, **converted)
            tokenizer.save_pretrained(staging)
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging, final)
        except Exception as err:
            reason = write_failure(err, out)
            shutil.rmtree(staging, ignore_errors=True)
            if reason is None:
                raise
            raise RunError(f"could not save {final} ({reason}); {kept_state(out / 'checkpoints')}") from None
    backend.accelerator.wait_for_everyone()
    return final
