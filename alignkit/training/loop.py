"""Where losses become updates: the one training loop every method runs on.

`fit(cfg, objective)` owns what every method shares: the back end, the run folder, resume, the model and its
optimizer, the step stream, the optimizer step with its non-finite guard, metrics, progress, trackers, the
eval/save/stop cadence, the summary and final/. A method is an `Objective` (recipes/sft.py, recipes/dpo.py):
its data, how a step's micro-batches become forward passes, and the loss and metric sums of one pass.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers.utils import logging as hf_logging

from alignkit.config import save_yaml
from alignkit.data.batches import batch_positions
from alignkit.data.view import data_view
from alignkit.log import log
from alignkit.models.load import build_policy, load_inputs
from alignkit.training import compiling, recompute, sparse_lookup, threads
from alignkit.training.backend import Backend, restore_fp32, store_frozen_linears_in_bf16
from alignkit.training.checkpoint import RunState, latest_checkpoint, resume_state, save_step
from alignkit.training.data_order import describe_tail, step_stream, steps_per_epoch
from alignkit.training.guard import NonFiniteGuard, StopOnSignal, agree_on_stop, interrupt
from alignkit.training.launch import relaunch, wants_relaunch
from alignkit.training.metrics import MetricsLog, Window, peak_memory_mib
from alignkit.training.optim import build_optimizer, build_scheduler
from alignkit.training.run_folder import (
    check_output_dir,
    claim_output_dir,
    release_run_folder,
    releases_run_folder_on_error,
    save_final,
)
from alignkit.training.tracking import open_tracking


@dataclass
class Data:
    """A method's rows: what it trains on, what it evaluates on, and what the summary says about them."""

    train: Sequence
    eval: Sequence
    rows: dict  # the summary's row statistics (truncated, dropped, skipped, ...)
    sources: list[dict]  # a summary row per data source (see `data.mixture`)


@dataclass
class StepResult:
    """What a step (or an evaluation) reports: means for the log and their weight (trained tokens, pairs) when
    steps are averaged, and counts that add up over the run (tokens, pairs)."""

    means: dict[str, float]
    weight: float
    counts: dict[str, int] = field(default_factory=dict)


class Objective(Protocol):
    """What a training method tells the loop. Units are whatever the method's forward passes take. An objective
    may also have `build_model(cfg, model_path, checkpoint)`, for a model other than `build_policy`'s causal LM."""

    name: str  # sft | dpo: the run folder's prefix and the progress bar's label
    counts: tuple[str, ...]  # the StepResult counts the run adds up (they go to checkpoints and the summary)

    def load_data(self, tokenizer, template: str) -> Data: ...

    def longest_forward(self, rows: Sequence, device: torch.device) -> int:
        """Tokens in the largest forward pass (what activation memory scales with)."""

    def reserved_bytes(self, model) -> float:
        """Memory the method will still take beside the policy (a frozen reference), for memory planning."""

    def setup(self, model, model_path: Path, backend: Backend, data: Data) -> None:
        """Once the run folder is claimed, before the optimizer: load what else the method needs."""

    def frozen_models(self) -> list: ...

    def describe(self, device: torch.device) -> str: ...

    def totals(self, batches: list[Sequence]) -> torch.Tensor:
        """What the step's losses are normalised by (trained tokens, pairs), as a 1-D tensor of this process's
        rows; summed over processes by the loop."""

    def units(self, batches: list[Sequence], split: str) -> list:
        """The forward passes of these micro-batches; `split` is train or eval."""

    def loss(self, model, unit, totals: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The unit's share of the step loss, and sums the loop adds up over passes and processes."""

    def step_result(self, sums: dict[str, torch.Tensor], totals: torch.Tensor) -> StepResult: ...

    def eval_metrics(self, sums: dict[str, torch.Tensor]) -> dict: ...

    def postfix(self, row: dict) -> dict: ...

    def summary(self, state: RunState, last: StepResult) -> dict: ...


def run(cfg, objective: Objective) -> dict:
    """Train and save, re-running under torch's launcher when `num_processes` asks for it; the summary."""
    if wants_relaunch(cfg):
        return relaunch(cfg, objective.name)
    return fit(cfg, objective, keep_model=False)[0]


@releases_run_folder_on_error
def fit(cfg, objective: Objective, keep_model: bool = True):
    """Train and save; returns (summary, trained model, tokenizer) for callers that keep working with them
    (`keep_model`: with its layers in the dtypes it was loaded in; else as training left them)."""
    started = time.time()
    backend = Backend.build(cfg.dtype, cfg.strategy)
    out = check_output_dir(cfg, objective.name, backend.is_main)
    checkpoint = latest_checkpoint(out / "checkpoints") if cfg.resume else None
    if cfg.resume and checkpoint is None:
        log(f"no checkpoint in {out / 'checkpoints'}: starting from the beginning")
    set_seed(cfg.seed)

    model_path, tokenizer, template = load_inputs(cfg)
    data = objective.load_data(tokenizer, template)  # one process tokenises at a time
    model = getattr(objective, "build_model", build_policy)(cfg, model_path, checkpoint)
    bf16_layers = store_frozen_linears_in_bf16(model) if bf16_base(cfg, backend) else []
    recomputed = recompute.configure(model, cfg.activation_checkpointing,
                                        objective.longest_forward(data.train, backend.device), backend.device,
                                        half=backend.half or cfg.dtype == "bf16",
                                        extra_bytes=objective.reserved_bytes(model))
    claim_output_dir(cfg, out, backend.is_main)
    if backend.is_main:
        save_yaml(cfg, out / "config.yaml")
        (out / "data.json").write_text(json.dumps(data_view(data.train, data.rows, tokenizer, cfg.max_length)))
    objective.setup(model, model_path, backend, data)

    per_epoch = steps_per_epoch(len(batch_positions(len(data.train), cfg.batch_size, cfg.seed, 0, backend.rank,
                                                    backend.world)), cfg.grad_accum)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * per_epoch))
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, cfg.loraplus_lr_ratio)
    scheduler = build_scheduler(optimizer, cfg.lr_scheduler, total_steps, cfg.warmup_ratio)
    is_compiled, compiled = compiling.configure(model, cfg.compile, total_steps, backend.device, backend.partitioned)
    for frozen in objective.frozen_models() if is_compiled else []:
        compiling.configure(frozen, "on", total_steps, backend.device, False)

    # The data position (epoch, index of the next micro-batch) is what makes a resume continue mid-epoch.
    state = RunState(dict.fromkeys(objective.counts, 0))
    if checkpoint is not None:
        state = resume_state(checkpoint, optimizer, scheduler, backend, objective.counts)
        log(f"resuming from {checkpoint} (step {state.step})")
        if state.total_steps not in (None, total_steps):
            log(f"the run now has {total_steps} steps instead of {state.total_steps}: the lr schedule continues "
                "from the checkpoint's position, not from a schedule planned for the new length")
    state.total_steps = total_steps
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)  # before ZeRO-3 partitions them
    model, optimizer = backend.prepare(model, optimizer, cfg.batch_size, cfg.max_grad_norm)
    sparse_lookup.configure(model, backend)
    if checkpoint is not None:
        backend.load_partitioned_optimizer_state(checkpoint, model, optimizer)
    model.train()
    metrics = (MetricsLog(out / "metrics.jsonl", keep_until_step=state.step, tracking=open_tracking(cfg, out))
               if backend.is_main else None)
    log(f"{len(data.train)} training rows, {len(data.eval)} eval rows, {total_steps} steps, global batch "
        f"{cfg.batch_size} x {backend.world} processes x {cfg.grad_accum} accumulation ({backend.describe()}), "
        f"{trainable:,} trainable parameters, {objective.describe(backend.device)}, precision "
        f"{backend.accelerator.mixed_precision}, activation checkpointing {recomputed}, compile {compiled}")
    if tail := describe_tail(len(data.train), cfg.batch_size, backend.world):
        log(tail)

    stream = step_stream(data.train, cfg, state.epoch, state.index, backend.rank, backend.world)
    filler = objective.units([[data.train[0]]], "train")[0]
    progress = tqdm(total=total_steps, initial=state.step, disable=not backend.is_main, desc=objective.name,
                    unit="step", dynamic_ncols=True)
    train_start = time.time() - state.train_seconds
    window = Window()
    last = StepResult({}, 0.0)
    eval_result: dict = {}
    guard = NonFiniteGuard(cfg.max_bad_steps)
    with StopOnSignal() as stop:
        while state.step < total_steps:
            batches, epoch, index = next(stream)
            began = time.time()
            last, grad_norm, lr, applied = train_step(model, objective, batches, filler, optimizer, scheduler, cfg,
                                                      backend, guard, state.step + 1)
            seconds = time.time() - began
            state.step, state.epoch, state.index, state.loss = state.step + 1, epoch, index, last.means["loss"]
            state.step_seconds += seconds
            for name in objective.counts:
                state.counts[name] += last.counts[name]
            window.add(last.means, last.weight, last.counts, seconds, applied)
            step = state.step
            progress.update(1)
            if step % cfg.logging_steps == 0 or step == total_steps:
                row = {"step": step, "epoch": round(step / per_epoch, 4), **window.row(), "lr": lr,
                       "grad_norm": grad_norm, "elapsed_s": round(time.time() - train_start, 2)}
                if metrics:
                    metrics.write(row)
                progress.set_postfix(**objective.postfix({**row, "lr": lr}))
                window = Window()
            if data.eval and ((cfg.eval_steps and step % cfg.eval_steps == 0) or step == total_steps):
                eval_result = evaluate(model, objective, data.eval, cfg.batch_size, backend)
                if metrics:
                    metrics.write({"step": step, "epoch": round(step / per_epoch, 4), **eval_result})
                progress.write(f"step {step}: eval loss {eval_result['eval/loss']:.4f}")
            due = (cfg.save_steps and step % cfg.save_steps == 0) or (cfg.save_last and step == total_steps)
            stopping = agree_on_stop(stop, backend.accelerator)
            threads.adjust()  # another run may have started or ended on this machine
            if (due and guard.in_a_row == 0) or stopping:  # never checkpoint in the middle of a NaN streak
                state.train_seconds = time.time() - train_start
                save_step(out, step, model, tokenizer, optimizer, scheduler, state, cfg.save_total_limit, backend)
            if stopping:
                progress.close()
                raise interrupt(stop, step, out)
    progress.close()
    train_seconds = time.time() - train_start
    final = save_final(model, tokenizer, out, backend)
    summary = {
        "final_loss": state.loss,
        "steps": state.step,
        **objective.summary(state, last),
        "peak_memory_mib": round(peak_memory_mib(backend.device), 1),
        "rows": {"used": len(data.train), "eval": len(data.eval), **data.rows},
        "sources": data.sources,
        "skipped_steps": guard.skipped,
        "train_seconds": round(train_seconds, 2),
        "wall_seconds": round(time.time() - started, 2),
        **eval_result,
        "output_dir": str(out),
        "final": str(final),
    }
    if backend.is_main:
        metrics.close()
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        log(f"done: {state.step} steps, final loss {summary['final_loss']}, {summary['tokens_per_s']} "
            f"tokens/s; model in {final}")
    release_run_folder(out)
    hf_logging.enable_progress_bar()
    if keep_model:
        restore_fp32(bf16_layers)
    return summary, backend.unwrap(model), tokenizer


def train_step(model, objective: Objective, batches: list[Sequence], filler, optimizer, scheduler, cfg,
               backend: Backend, guard: NonFiniteGuard, step: int) -> tuple[StepResult, float, float, bool]:
    """One optimizer step over its micro-batches: (what it reports, grad norm, lr, applied).

    Each forward pass is followed by its backward, so only one pass's activations are alive. A step whose loss
    or gradient norm is not finite is not applied (`training.guard`)."""
    totals = backend.reduce(objective.totals(batches).to(backend.device), "sum").clamp(min=1)
    units = objective.units(batches, "train")
    passes = backend.equal_passes(units, filler)
    sums: dict = {}
    with backend.autocast():
        for i, (unit, weight) in enumerate(passes):
            last = i == len(passes) - 1
            with backend.no_sync(model, last):
                loss, unit_sums = objective.loss(model, unit, totals)
                # DDP and ZeRO average gradients over processes; multiplying by their number restores the sum.
                backend.backward(model, loss * weight * backend.world, last)
            add_weighted(sums, unit_sums, weight)
    lr = scheduler.get_last_lr()[0]
    result = objective.step_result(reduced(sums, backend), totals)
    grad_norm, applied = backend.step(model, optimizer, cfg.max_grad_norm,
                                      lambda norm: guard.check(step, result.means["loss"], norm))
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return result, grad_norm, lr, applied


@torch.no_grad()
def evaluate(model, objective: Objective, rows: Sequence, batch_size: int, backend: Backend) -> dict:
    """The objective's metrics over `rows`, each process taking every world-th row."""
    model = backend.eval_model(model)
    model.eval()
    totals = objective.totals([rows]).clamp(min=1).to(backend.device)
    shard = [rows[i] for i in range(backend.rank, len(rows), backend.world)]
    units = objective.units([shard[s:s + batch_size] for s in range(0, len(shard), batch_size)], "eval")
    filler = objective.units([[rows[0]]], "eval")[0]
    sums: dict = {}
    with backend.autocast():
        for unit, weight in backend.equal_passes(units, filler):
            add_weighted(sums, objective.loss(model, unit, totals)[1], weight)
    model.train()
    return objective.eval_metrics(reduced(sums, backend))


def bf16_base(cfg, backend: Backend) -> bool:
    """Whether LoRA's frozen base is stored in bf16 (`backend.store_frozen_linears_in_bf16`): where bf16 autocast
    computes it in bf16 in every pass anyway. Not under FSDP or DeepSpeed (they hold one dtype per flat
    parameter and cast for themselves), DoRA (its magnitude adds the frozen weight to the update in the weight's
    own dtype) or PiSSA / OLoRA (which rewrite the base from its initial weights when saving)."""
    return cfg.lora and backend.half and not backend.partitioned and not cfg.use_dora and cfg.lora_init == "default"


def add_weighted(sums: dict, unit_sums: dict, weight: float) -> None:
    for name, value in unit_sums.items():
        # detached: a sum that kept its graph would keep every pass's activations alive until the step ends
        value = value.detach() if isinstance(value, torch.Tensor) else value
        sums[name] = sums.get(name, 0) + weight * value


def reduced(sums: dict, backend: Backend) -> dict[str, torch.Tensor]:
    """Each sum added up over processes."""
    return {name: backend.reduce(torch.as_tensor(value, dtype=torch.float32, device=backend.device).detach(), "sum")
            for name, value in sums.items()}
