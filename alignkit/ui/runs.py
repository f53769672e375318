"""Run folders under the dashboard's root: which folders are runs, their status, their metrics, safe paths.

A folder is a run when it holds metrics.jsonl, config.yaml, summary.json or launch.json (written by the dashboard
when it starts a run). Status, first rule that applies:

| status    | rule                                                                                          |
|-----------|-----------------------------------------------------------------------------------------------|
| finished  | summary.json exists (the recipes write it last; a pipeline's process lives on after a stage)  |
| running   | run.pid (written by the recipe when it claims the folder) or launch.json names a live process; |
|           | with neither file, metrics.jsonl changed in the last 5 minutes                                |
| resumable | checkpoints/latest exists: `--resume` continues from it                                       |
| failed    | anything else: the process is gone, leaving no summary and no checkpoint                      |

A pid counts as live only when the process started before the pid file was written, so a pid reused by
another process after a crash does not keep a run "running".
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path, PurePosixPath

import yaml

RUN_MARKERS = ("metrics.jsonl", "config.yaml", "summary.json", "launch.json")
PID_FILES = ("run.pid", "launch.json")
FRESH_SECONDS = 300
MAX_DEPTH = 3


class PathRefused(ValueError):
    """A requested path that would leave the runs folder."""


def inside(root: Path, relative: str) -> Path:
    """root/relative, refused when it is absolute, climbs with '..', or resolves (symlinks followed) elsewhere."""
    if not relative or "\x00" in relative or "\\" in relative:
        raise PathRefused(f"refused path {relative!r}")
    parts = PurePosixPath(relative).parts
    if relative.startswith("/") or ".." in parts:
        raise PathRefused(f"refused path {relative!r}: absolute or '..'")
    base = root.resolve()
    target = (base / relative).resolve()
    if target != base and base not in target.parents:
        raise PathRefused(f"refused path {relative!r}: it leads outside the runs folder")
    return target


def discover(root: Path) -> list[str]:
    """Run names (paths relative to root, '/'-separated), newest first; symlinked folders are not followed."""
    found: list[tuple[float, str]] = []

    def walk(folder: Path, depth: int) -> None:
        for child in sorted(folder.iterdir()) if folder.is_dir() else []:
            if child.name.startswith(".") or child.is_symlink() or not child.is_dir():
                continue
            if any((child / marker).is_file() for marker in RUN_MARKERS):
                found.append((child.stat().st_mtime, child.relative_to(root).as_posix()))
            elif depth < MAX_DEPTH:
                walk(child, depth + 1)

    walk(root, 1)
    return [name for _, name in sorted(found, reverse=True)]


def process_started(pid: int) -> float | None:
    """When the process started (epoch seconds, Linux /proc), or None where that cannot be read."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, IndexError, ValueError):
        return None
    if fields[0] == "Z":  # a zombie has exited
        return float("inf")
    return time.time() - uptime + int(fields[19]) / os.sysconf("SC_CLK_TCK")


def pid_alive(pid: int, written: float) -> bool:
    """The process exists and is older than the file naming it (a reused pid would be younger)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process: it exists
    started = process_started(pid)
    return started is None or started <= written + 2.0


def read_pid(path: Path) -> int | None:
    try:
        text = path.read_text()
        return int(json.loads(text)["pid"] if path.suffix == ".json" else text.strip())
    except (OSError, ValueError, KeyError, TypeError):
        return None


def status(folder: Path) -> str:
    """finished, running, resumable or failed: see the module's table."""
    if (folder / "summary.json").is_file():
        return "finished"
    pid_files = [folder / name for name in PID_FILES if (folder / name).is_file()]
    for path in pid_files:
        pid = read_pid(path)
        if pid is not None and pid_alive(pid, path.stat().st_mtime):
            return "running"
    metrics = folder / "metrics.jsonl"
    if not pid_files and metrics.is_file() and time.time() - metrics.stat().st_mtime < FRESH_SECONDS:
        return "running"
    if (folder / "checkpoints" / "latest").is_file():
        return "resumable"
    return "failed"


def read_json(path: Path) -> dict:
    try:
        loaded = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def read_config(folder: Path) -> dict:
    try:
        loaded = yaml.safe_load((folder / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def method_of(folder: Path, config: dict) -> str:
    """sft or dpo: the dashboard's launch record says; otherwise only DPO configs carry a beta."""
    launched = read_json(folder / "launch.json").get("method")
    if launched:
        return launched
    return "dpo" if "beta" in config else "sft" if config else "?"


def last_step(folder: Path) -> int | None:
    """The step of the last complete metrics row (read from the end of the file, so it stays cheap)."""
    path = folder / "metrics.jsonl"
    if not path.is_file():
        return None
    with open(path, "rb") as handle:
        handle.seek(max(0, path.stat().st_size - 4096))
        for line in reversed(handle.read().splitlines()):
            try:
                return int(json.loads(line)["step"])
            except (ValueError, KeyError, TypeError):
                continue
    return None


def describe(root: Path, name: str) -> dict:
    """What the run list shows for one run."""
    folder = inside(root, name)
    config = read_config(folder)
    return {"name": name, "status": status(folder), "method": method_of(folder, config),
            "model": config.get("model"), "step": last_step(folder), "max_steps": config.get("max_steps") or None,
            "updated": max((folder / m).stat().st_mtime for m in RUN_MARKERS if (folder / m).is_file())}


def read_metrics(folder: Path, offset: int) -> dict:
    """Rows added since byte `offset` (complete lines only). A file shorter than offset was rewritten (a resume
    drops rows after its checkpoint): then every row is sent again with reset set."""
    path = folder / "metrics.jsonl"
    if not path.is_file():
        return {"rows": [], "offset": 0, "reset": offset > 0}
    size = path.stat().st_size
    reset = offset > size
    start = 0 if reset else offset
    with open(path, "rb") as handle:
        handle.seek(start)
        chunk = handle.read()
    complete = chunk[:chunk.rfind(b"\n") + 1]
    rows = []
    for line in complete.splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return {"rows": rows, "offset": start + len(complete), "reset": reset}


def files_of(folder: Path) -> dict:
    """The files the run page shows: the resolved config, the summary, the launch log, the report's PNG plots, and
    whether the run wrote its data view (data.json)."""
    pngs = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png")
                  if "checkpoints" not in p.parts and "final" not in p.parts)
    text = [name for name in ("config.yaml", "summary.json", "launch.log", "report.md") if (folder / name).is_file()]
    return {"text": text, "images": pngs, "data": (folder / "data.json").is_file()}
