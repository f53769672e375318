"""Checkpoints: `checkpoints/step-N/` with weights (or adapter), optimizer, scheduler, RNG and data position.

A checkpoint is written into a temporary folder, synced to disk and renamed into place; the `latest` file is
updated last. A crash at any moment therefore leaves the previous complete checkpoint as the newest one.
Optimizer and RNG states are loaded with `weights_only=True`: tensors and plain containers, never pickled code.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from alignkit.errors import RunError
from alignkit.models.load import no_hub_lookup

STEP_DIR = re.compile(r"^step-(\d+)$")
OS_ERROR = re.compile(r"os error (\d+)")
NEARLY_FULL = 1 << 20  # bytes: less than this free where a write just failed means the disk filled up


def write_failure(err: Exception, folder: Path) -> str | None:
    """Why writing into `folder` failed, when the disk is the cause; None for anything else (a bug to show).

    A full disk reaches us as an OSError from Python's own writes, but as a SafetensorError naming the os error
    from safetensors and as a bare RuntimeError ("unexpected pos") from torch.save's zip writer; for the last,
    the free space left is the evidence. Call it before freeing anything."""
    if isinstance(err, OSError):
        return err.strerror or str(err)
    if match := OS_ERROR.search(str(err)):
        return os.strerror(int(match.group(1)))
    try:
        free = shutil.disk_usage(folder if folder.exists() else folder.parent).free
    except OSError:
        return None
    return os.strerror(errno.ENOSPC) if free < NEARLY_FULL else None


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(root: Path, step: int, model, tokenizer, optimizer, scheduler, train_state: dict,
                    keep: int, process_rngs: list[dict] | None = None,
                    sharded: tuple[dict | None, dict | None] | None = None, engine_state: Path | None = None
                    ) -> Path:
    """Write step-N/ atomically. `process_rngs` holds every process's RNG state (rank order) under a
    distributed launch: rank 0's goes to rng.pt, rank r's to rng-r.pt, so each process resumes its own draws.
    `sharded` is (full weights, full optimizer state) gathered from FSDP shards, saved instead of the
    model's and optimizer's own (which would hold only this process's shard); under DeepSpeed the optimizer
    state is None and `engine_state`, the folder the engine wrote its partitions into, becomes deepspeed/."""
    weights, optimizer_state = sharded or (None, optimizer.state_dict())
    final = root / f"step-{step}"
    staging = root / f".tmp-step-{step}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir()
        with no_hub_lookup():
            model.save_pretrained(staging / "model", state_dict=weights)
        tokenizer.save_pretrained(staging / "model")
        if optimizer_state is not None:
            torch.save(optimizer_state, staging / "optimizer.pt")
        if engine_state is not None:
            os.replace(engine_state, staging / "deepspeed")
        torch.save(scheduler.state_dict(), staging / "scheduler.pt")
        for rank, state in enumerate(process_rngs or [rng_state()]):
            torch.save(state, staging / ("rng.pt" if rank == 0 else f"rng-{rank}.pt"))
        (staging / "state.json").write_text(json.dumps(train_state, indent=1))
        _fsync_tree(staging)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        pointer = root / ".latest.tmp"
        pointer.write_text(final.name)
        os.replace(pointer, root / "latest")
    except Exception as err:  # disk full, quota, permissions: the previous checkpoint was never touched
        reason = write_failure(err, root)
        shutil.rmtree(staging, ignore_errors=True)
        if engine_state is not None:
            shutil.rmtree(engine_state, ignore_errors=True)
        if reason is None:
            raise
        raise RunError(f"could not save checkpoint {final} ({reason}); {kept_state(root)}") from None
    _rotate(root, keep)
    return final


def kept_state(root: Path) -> str:
    """What a failed save leaves to continue from, and how."""
    kept = latest_checkpoint(root)
    if kept is None:
        return "no checkpoint is kept"
    return f"the previous checkpoint {kept} is intact: free some space and run the same command with --resume"


def _rotate(root: Path, keep: int) -> None:
    if keep <= 0:
        return
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if (p / "state.json").is_file()]


def latest_checkpoint(root: Path) -> Path | None:
    pointer = root / "latest"
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if (named / "state.json").is_file():
            return named
    found = list_checkpoints(root)
    return found[-1] if found else None


def load_training_state(checkpoint: Path, optimizer, scheduler, rank: int = 0) -> dict:
    """Optimizer, scheduler and this process's RNG state (rank 0's where the checkpoint has none for `rank`).

    `optimizer` None leaves the optimizer state for later: an FSDP run loads it into the sharded optimizer
    after `prepare` (`training.strategy.load_full_optimizer_state`)."""
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt", weights_only=True))
    own = checkpoint / f"rng-{rank}.pt"
    set_rng_state(torch.load(own if rank and own.is_file() else checkpoint / "rng.pt", weights_only=True))
    return json.loads((checkpoint / "state.json").read_text())


@dataclass
class RunState:
    """Where a run stands; each checkpoint's state.json holds it, so that --resume continues exactly there.

    `epoch` and `index` (the epoch's next micro-batch) are the data position, `counts` what the run has trained
    so far (tokens, pairs), the seconds leave set-up out, and `total_steps` is the length the lr schedule was
    planned for."""

    counts: dict[str, int]
    step: int = 0
    epoch: int = 0
    index: int = 0
    train_seconds: float = 0.0
    step_seconds: float = 0.0
    loss: float | None = None
    total_steps: int | None = None

    def to_json(self) -> dict:
        """state.json's fields, the counts among them (where checkpoints have always kept them)."""
        return {**{f.name: getattr(self, f.name) for f in fields(self) if f.name != "counts"}, **self.counts}

    @classmethod
    def from_json(cls, saved: dict, counts: tuple[str, ...]) -> RunState:
        known = {f.name for f in fields(cls)} - {"counts"}
        return cls({name: saved.get(name, 0) for name in counts}, **{k: v for k, v in saved.items() if k in known})


def process_rngs(accelerator: Accelerator) -> list[dict]:
    """Every process's RNG state, rank order, for the main process to save (called by all processes)."""
    from accelerate.utils import gather_object

    return gather_object([rng_state()]) if accelerator.num_processes > 1 else [rng_state()]


def save_step(out: Path, step: int, model, tokenizer, optimizer, scheduler, state: RunState, keep: int,
              backend) -> None:
    """A checkpoint of this step: what must be gathered is gathered by every process, the main one writes.

    Under DeepSpeed every process first writes its optimizer partition beside the checkpoint; the main process
    moves that folder into it (deepspeed/), so it appears atomically with the rest."""
    rngs = process_rngs(backend.accelerator)
    sharded = backend.full_training_state(model, optimizer)
    engine_state = backend.write_engine_state(model, out / "checkpoints" / f".tmp-deepspeed-step-{step}")
    if backend.is_main:
        save_checkpoint(out / "checkpoints", step, backend.unwrap(model), tokenizer, optimizer, scheduler,
                        {**state.to_json(), **backend.layout_of_checkpoints()}, keep, rngs, sharded, engine_state)
    backend.accelerator.wait_for_everyone()


def resume_state(checkpoint: Path, optimizer, scheduler, backend, counts: tuple[str, ...]) -> RunState:
    """Scheduler, RNG and position from `checkpoint`, and the optimizer state, except under FSDP and DeepSpeed,
    where it can only be loaded once `prepare` has partitioned the optimizer
    (`Backend.load_partitioned_optimizer_state`)."""
    saved = json.loads((checkpoint / "state.json").read_text())
    later = backend.check_resumable(checkpoint, saved)
    saved = load_training_state(checkpoint, None if later else optimizer, scheduler, backend.rank)
    return RunState.from_json(saved, counts)
