"""What every recipe does around its loop: accelerator, run folder, data order, final save."""

from __future__ import annotations

import fcntl
import functools
import json
import math
import os
import random
import shutil
import signal
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import torch
from accelerate import Accelerator

from alignkit.data.batches import batch_positions, tail_rows
from alignkit.data.store import take
from alignkit.errors import Interrupted, RunError, UserError
from alignkit.models.load import no_hub_lookup
from alignkit.training.checkpoint import kept_state, load_training_state, save_checkpoint, write_failure

RUN_FILES = ("metrics.jsonl", "summary.json", "config.yaml", "final", "checkpoints", "tensorboard", "wandb",
             "mlruns", "tracking.json")
PID_FILE = "run.pid"
LOCK_FILE = "run.lock"
_HELD: dict[Path, int] = {}  # run folder -> the open lock file whose flock this process holds


def load_inputs(cfg):
    """(model folder, tokenizer, chat template) for a training run, data paths checked first.

    The data paths are checked before the model is resolved, so a typo never waits for a model download. The
    tokenizer keeps the template it is trained with, so final/ carries it; a built-in chosen for a model without
    a template is recorded as `cfg.chat_template`, so config.yaml names it."""
    from transformers.utils import logging as hf_logging

    from alignkit.data.mixture import source_paths
    from alignkit.data.sources import require
    from alignkit.data.templates import choose_template
    from alignkit.models.embedded import log
    from alignkit.models.load import load_tokenizer, resolve_model

    for path in source_paths(cfg.data) + cfg.eval_data:
        require(Path(path))
    model_path = resolve_model(cfg.model)
    hf_logging.disable_progress_bar()  # our bar is the one to watch; weight loading and saving stay quiet
    tokenizer = load_tokenizer(model_path, cfg.trust_remote_code)
    choice = choose_template(tokenizer, cfg.chat_template)
    if choice.name or choice.source != tokenizer.chat_template:  # the tokenizer's own, unchanged, goes unsaid
        log(f"chat template: {choice.name} ({choice.reason})" if choice.name else f"chat template: {choice.reason}")
    cfg.chat_template = choice.name
    tokenizer.chat_template = choice.source
    return model_path, tokenizer, tokenizer.chat_template


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
    """Decorate a recipe's train(cfg): a run that fails lets go of the folders it locked, so that a process that
    goes on (the Python API, a notebook, a pipeline) can run there again, or another process can."""
    @functools.wraps(train)
    def guarded(cfg):
        before = set(_HELD)
        try:
            return train(cfg)
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


def split_eval(rows: Sequence, fraction: float, seed: int) -> tuple[Sequence, Sequence]:
    """(training rows, held-out rows): a seeded `fraction` of the rows held out, both kept in their order."""
    if fraction <= 0:
        return rows, []
    if not rows:
        raise UserError("no usable rows to train on (every row was skipped as bad or dropped as too long)")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(fraction * len(rows)))
    if n_eval >= len(rows):
        raise UserError(f"eval_fraction {fraction} leaves no training rows out of {len(rows)}")
    held = set(order[:n_eval])
    return (take(rows, [i for i in range(len(rows)) if i not in held]),
            take(rows, [i for i in range(len(rows)) if i in held]))


def steps_per_epoch(num_batches: int, grad_accum: int) -> int:
    return math.ceil(num_batches / grad_accum)


def step_stream(rows: Sequence, cfg, epoch: int, index: int, rank: int, world: int):
    """Yield (micro-batches of one step, epoch, index after it), endlessly, from a saved position.

    Only the step's rows are read from `rows` (stored rows become Python lists one step at a time). Empty
    micro-batches (this process's share of a short last global batch) are left out, so a process can get a
    step without rows; the back end gives it the passes the others wait for (`Backend.equal_passes`)."""
    while True:
        batches = batch_positions(len(rows), cfg.batch_size, cfg.seed, epoch, rank, world)
        while index < len(batches):
            live = [[rows[i] for i in b] for b in batches[index:index + cfg.grad_accum] if b]
            index = min(index + cfg.grad_accum, len(batches))
            yield live, epoch, index
        epoch, index = epoch + 1, 0


def describe_tail(num_rows: int, batch_size: int, world: int) -> str:
    """The log line about an epoch's short last global batch, or '' when the rows divide evenly."""
    tail = tail_rows(num_rows, batch_size, world)
    if not tail:
        return ""
    return (f"{tail} rows of the last partial global batch of each epoch are trained as a smaller batch "
            f"(split over {world} processes)" if world > 1 else
            f"{tail} rows of the last partial batch of each epoch are trained as a smaller batch")


def save_final(model, tokenizer, out: Path, backend) -> Path:
    """final/: written beside, then renamed into place, so a failed save never leaves half a model."""
    final, staging = out / "final", out / ".final.tmp"
    weights = backend.full_state_dict(model)  # every process takes part in gathering FSDP shards
    if backend.is_main:
        try:
            shutil.rmtree(staging, ignore_errors=True)
            with no_hub_lookup():
                backend.unwrap(model).save_pretrained(staging, state_dict=weights)
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


def process_rngs(accelerator: Accelerator) -> list[dict]:
    """Every process's RNG state, rank order, for the main process to save (called by all processes)."""
    from accelerate.utils import gather_object

    from alignkit.training.checkpoint import rng_state

    return gather_object([rng_state()]) if accelerator.num_processes > 1 else [rng_state()]


def save_step(out: Path, step: int, model, tokenizer, optimizer, scheduler, state: dict, keep: int,
              backend) -> None:
    """A checkpoint of this step: what must be gathered is gathered by every process, the main one writes.

    Under DeepSpeed every process first writes its optimizer partition beside the checkpoint; the main process
    moves that folder into it (deepspeed/), so it appears atomically with the rest."""
    rngs = process_rngs(backend.accelerator)
    state.update(backend.layout_of_checkpoints())
    sharded = backend.full_training_state(model, optimizer)
    engine_state = backend.write_engine_state(model, out / "checkpoints" / f".tmp-deepspeed-step-{step}")
    if backend.is_main:
        save_checkpoint(out / "checkpoints", step, backend.unwrap(model), tokenizer, optimizer, scheduler,
                        state, keep, rngs, sharded, engine_state)
    backend.accelerator.wait_for_everyone()


def resume_state(checkpoint: Path, optimizer, scheduler, backend) -> dict:
    """Scheduler, RNG and position from `checkpoint`, and the optimizer state, except under FSDP and DeepSpeed,
    where it can only be loaded once `prepare` has partitioned the optimizer
    (`Backend.load_partitioned_optimizer_state`)."""
    saved = json.loads((checkpoint / "state.json").read_text())
    later = backend.check_resumable(checkpoint, saved)
    return load_training_state(checkpoint, None if later else optimizer, scheduler, backend.rank)


def agree_on_stop(stop, accelerator: Accelerator) -> bool:
    """Whether any process received SIGINT/SIGTERM, the same answer on all of them, once per step.

    A scheduler's signal can reach the processes a step apart; the process that has it must not start saving
    (a collective) while the others start another step, so each step ends with a max-reduce of the signal
    number, and a process that got none adopts it. The answer is the reduced number alone: a signal that lands
    during the reduce is seen by this process only, and counts at the next step's agreement."""
    if accelerator.num_processes == 1:
        return stop.received is not None
    flag = torch.tensor(float(stop.received or 0), device=accelerator.device)
    received = int(accelerator.reduce(flag, "max").item())
    if received and stop.received is None:
        stop.received = received
    return received != 0


def interrupt(stop, step: int, out: Path) -> Interrupted:
    """The exception that ends a run stopped by a signal, with how to continue it."""
    return Interrupted(f"stopped by {signal.Signals(stop.received).name} after step {step}; checkpoint saved in "
                       f"{out / 'checkpoints'}. Run the same command with --resume to continue", stop.exit_code)
