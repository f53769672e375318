"""CPU threads per training process: the machine's cores, shared by every alignkit process training on it.

Each training process (every rank of a `--num-processes` launch, every run the dashboard starts, every run
typed in a terminal) holds an flock on a file in `$ALIGNKIT_CACHE/live/` for its life. Its torch thread count
is cores // live processes, at least 1, counted when it starts and again every few seconds while it trains,
so two runs on 2 cores take one core each and the survivor takes both back when the other ends. Without this,
each process starts one thread per core, and N processes on C cores run N * C spinning OpenMP threads.

OMP_NUM_THREADS set by the user wins and is never changed; the value a `--num-processes` launch sets for its
processes (torch's launcher would otherwise give each one thread) is marked as ours and is adjusted like any
other. "Cores" are the ones this process may run on (its CPU affinity, which a container or `taskset` narrows).
The registry's files hold the pid; a file whose lock is free was left by a killed process and is removed.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

OURS = "ALIGNKIT_SET_OMP_NUM_THREADS"  # set beside OMP_NUM_THREADS when alignkit chose the value
RECOUNT_SECONDS = 5.0
_held: dict[str, object] = {}  # "fd": this process's registry file, "checked": when the share was last counted


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def user_chose() -> bool:
    return "OMP_NUM_THREADS" in os.environ and os.environ.get(OURS) != "1"


def registry() -> Path:
    from alignkit.paths import cache_root

    return cache_root() / "live"


def register() -> None:
    """Count this process as training on the machine, for as long as it lives; then take its share."""
    if "fd" not in _held:
        folder = registry()
        folder.mkdir(parents=True, exist_ok=True)
        staging = folder / f".{os.getpid()}.{time.monotonic_ns()}"
        fd = os.open(staging, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, str(os.getpid()).encode())
        os.replace(staging, folder / f"{os.getpid()}.{time.monotonic_ns()}.live")  # locked before it is counted
        _held["fd"] = fd
    adjust(force=True)


def live_processes() -> int:
    """Registry files whose lock is held; the others, left by killed processes, are removed."""
    live = 0
    for path in registry().glob("*.live"):
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            live += 1
        else:
            path.unlink(missing_ok=True)
        finally:
            os.close(fd)
    return live


def share() -> int:
    return max(1, cores() // max(1, live_processes()))


def adjust(force: bool = False) -> None:
    """Set torch's thread count to this process's share, at most every RECOUNT_SECONDS (called once a step)."""
    now = time.monotonic()
    if user_chose() or (not force and now - float(_held.get("checked", 0.0)) < RECOUNT_SECONDS):
        return
    _held["checked"] = now
    import torch

    threads = share()
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
