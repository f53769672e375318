"""The SFT recipe: set up → train loop → checkpoint, in one file.

Loss: mean cross-entropy over every trained token of the optimizer step (see `alignkit.losses.sft`).
Runs unchanged on one process or under `accelerate launch` / `torchrun`.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers.utils import logging as hf_logging

from alignkit.config import SFTConfig, save_yaml
from alignkit.data.batches import batch_positions
from alignkit.data.cache import load_sft_rows
from alignkit.data.mixture import load_mixture, log_mixture
from alignkit.data.packing import sft_units
from alignkit.data.store import lengths
from alignkit.data.tokenize import Rendering, TokenizedRow, merge_stats, trained_label_count
from alignkit.errors import UserError
from alignkit.losses import sft_loss
from alignkit.models.embedded import log
from alignkit.models.load import build_policy
from alignkit.training import checkpointing, compiling, sparse_lookup, threads, zero
from alignkit.training.checkpoint import latest_checkpoint
from alignkit.training.forward import unit_sequence_logps
from alignkit.training.guard import NonFiniteGuard, StopOnSignal
from alignkit.training.launch import relaunch, wants_relaunch
from alignkit.training.metrics import MetricsLog, Window, peak_memory_mib
from alignkit.training.optim import build_optimizer, build_scheduler
from alignkit.training.run import (
    agree_on_stop,
    check_output_dir,
    claim_output_dir,
    describe_tail,
    interrupt,
    load_inputs,
    make_accelerator,
    release_run_folder,
    releases_run_folder_on_error,
    resume_state,
    save_final,
    save_step,
    split_eval,
    step_stream,
    steps_per_epoch,
)
from alignkit.training.strategy import (
    autocast_region,
    backward,
    describe,
    equal_passes,
    eval_model,
    is_sharded,
    load_partitioned_optimizer_state,
    optimizer_step,
    prepare,
)
from alignkit.training.tracking import open_tracking

# ---------------------------------------------------------------- set-up

def load_data(cfg: SFTConfig, tokenizer, template: str):
    """(training rows drawn from the data sources, eval rows, merged statistics, a summary row per source)."""
    def load_source(path: str):
        rows, stats, cached = load_sft_rows([path], cfg.data_format, tokenizer, template, cfg.max_length,
                                            on_bad_row=cfg.on_bad_row, num_proc=cfg.num_proc,
                                            rendering=Rendering.of(cfg))
        if cached:
            log(f"{path}: tokenised rows loaded from cache")
        return rows, stats

    train, source_stats, sources = load_mixture(cfg.data, cfg.mix_total, cfg.seed, load_source, trained_label_count)
    stats = merge_stats(source_stats)
    eval_rows: Sequence = []
    if cfg.eval_data:
        eval_rows, _, _ = load_sft_rows(cfg.eval_data, cfg.data_format, tokenizer, template, cfg.max_length,
                                        on_bad_row=cfg.on_bad_row, num_proc=cfg.num_proc,
                                        rendering=Rendering.of(cfg))
    else:
        train, eval_rows = split_eval(train, cfg.eval_fraction, cfg.seed)
    if not train:
        raise UserError("no training rows: the data mixture drew none" if stats.rows else
                        "no training rows left after dropping rows whose prompt alone exceeds max_length")
    if stats.dropped:
        shown = ", ".join(stats.dropped_origins[:3])
        log(f"dropped {stats.dropped} rows whose prompt alone fills max_length={cfg.max_length} (e.g. {shown})")
    if stats.repaired:
        log(f"repaired {stats.repaired} conversations (see data_format in docs/sft.md), e.g. {stats.repaired_rows[0]}")
    if stats.skipped:
        log(f"skipped {stats.skipped} bad rows (on_bad_row: skip), e.g. {stats.skipped_rows[0]}")
    log_mixture(sources, "rows")
    return train, eval_rows, stats, sources


# ---------------------------------------------------------------- the loop's parts

def resolve_layout(layout: str, device: torch.device) -> str:
    """auto: one sequence per forward on CPU (SDPA's unmasked fast path), packed rows on GPU."""
    if layout != "auto":
        return layout
    return "packed" if device.type == "cuda" else "per_sequence"


def longest_forward(rows: Sequence, cfg: SFTConfig, device: torch.device) -> int:
    """Tokens in the largest forward pass the layout makes (what activation memory scales with)."""
    longest = int(lengths(rows).max())
    layout = resolve_layout(cfg.layout, device)
    return {"packed": cfg.batch_size * max(cfg.max_length, longest),  # up to a bin per row
            "padded": cfg.batch_size * longest}.get(layout, longest)


def unit_logps(model, unit) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ log π over each of the unit's sequences' trained tokens (with grad), and their numbers."""
    sums, counts = unit_sequence_logps(model, unit, 1 if unit.sequence_ids is None else
                                       int(unit.sequence_ids.max()) + 1)
    return sums, counts


def train_step(model, optimizer, scheduler, step_batches: list[list[TokenizedRow]], weight: float, cfg: SFTConfig,
               pad_id: int, accelerator: Accelerator, guard: NonFiniteGuard,
               step: int) -> tuple[float, int, float, float, bool]:
    """One optimizer step over its micro-batches: (summed NLL, trained tokens, grad norm, lr, applied), global.

    Each micro-batch is laid out as `cfg.layout` says; each forward pass is followed by its backward, so only
    one pass's activations are alive. A step whose loss or gradient norm is not finite is not applied. `weight`
    0 marks a filler row (see `training.run.step_stream`): it runs the passes and counts for nothing."""
    device = accelerator.device
    layout = resolve_layout(cfg.layout, device)
    units = [u.to(device) for rows in step_batches for u in sft_units(rows, layout, pad_id, cfg.max_length)]
    local_tokens = torch.tensor(weight * sum(trained_label_count(rows) for rows in step_batches), device=device)
    step_tokens = accelerator.reduce(local_tokens, "sum").clamp(min=1)
    step_nll = torch.zeros((), device=device)
    passes = equal_passes(units, units[0], accelerator)
    with autocast_region(accelerator):
        for i, (unit, pass_weight) in enumerate(passes):
            last = i == len(passes) - 1
            with contextlib.nullcontext() if last else accelerator.no_sync(model):
                sums, _ = unit_logps(model, unit)
                sums = sums * (weight * pass_weight)
                # DDP and ZeRO average gradients over processes; multiplying by their number restores the sum.
                loss = sft_loss(sums, torch.ones_like(sums, dtype=torch.bool), step_tokens) * accelerator.num_processes
                backward(model, loss, last, accelerator)
            step_nll -= sums.detach().sum()
    lr = scheduler.get_last_lr()[0]
    nll, tokens = accelerator.reduce(step_nll, "sum").item(), int(step_tokens.item())
    grad_norm, applied = optimizer_step(model, optimizer, cfg.max_grad_norm, accelerator,
                                        lambda norm: guard.check(step, nll / tokens, norm))
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return nll, tokens, grad_norm, lr, applied


@torch.no_grad()
def evaluate(model, rows: Sequence, cfg: SFTConfig, pad_id: int, accelerator: Accelerator) -> dict:
    model = eval_model(model, accelerator)
    model.eval()
    layout = resolve_layout(cfg.layout, accelerator.device)
    shard = list(rows[accelerator.process_index::accelerator.num_processes])
    nll = torch.zeros((), device=accelerator.device)
    tokens = torch.zeros((), device=accelerator.device)
    units = [u for start in range(0, len(shard), cfg.batch_size)
             for u in sft_units(shard[start:start + cfg.batch_size], layout, pad_id, cfg.max_length)]
    filler = sft_units([rows[0]], layout, pad_id, cfg.max_length)[0]
    with autocast_region(accelerator):
        for unit, weight in equal_passes(units, filler, accelerator):
            sums, counts = unit_logps(model, unit.to(accelerator.device))
            nll -= weight * sums.sum()
            tokens += weight * counts.sum()
    model.train()
    nll, tokens = accelerator.reduce(nll, "sum"), accelerator.reduce(tokens, "sum")
    loss = (nll / tokens.clamp(min=1)).item()
    return {"eval/loss": loss, "eval/ppl": math.exp(min(loss, 50.0)), "eval/tokens": int(tokens.item())}


# ---------------------------------------------------------------- the recipe

def run(cfg: SFTConfig) -> dict:
    """Train and save; returns the summary written to OUTPUT_DIR/summary.json."""
    if wants_relaunch(cfg):
        return relaunch(cfg, "sft")
    return train(cfg)[0]


@releases_run_folder_on_error
def train(cfg: SFTConfig):
    """Train and save; returns (summary, trained model, tokenizer) for callers that keep working with them."""
    started = time.time()
    accelerator = make_accelerator(cfg.dtype, cfg.strategy)
    is_main = accelerator.is_main_process
    out = check_output_dir(cfg, "sft", is_main)
    checkpoint = latest_checkpoint(out / "checkpoints") if cfg.resume else None
    if cfg.resume and checkpoint is None:
        log(f"no checkpoint in {out / 'checkpoints'}: starting from the beginning")
    set_seed(cfg.seed)

    model_path, tokenizer, template = load_inputs(cfg)
    train_rows, eval_rows, stats, sources = load_data(cfg, tokenizer, template)  # one process tokenises at a time
    model = build_policy(cfg, model_path, checkpoint)
    recompute = checkpointing.configure(model, cfg.activation_checkpointing,
                                        longest_forward(train_rows, cfg, accelerator.device), accelerator.device,
                                        half=accelerator.mixed_precision == "bf16" or cfg.dtype == "bf16")
    claim_output_dir(cfg, out, is_main)
    if is_main:
        save_yaml(cfg, out / "config.yaml")

    rank, world = accelerator.process_index, accelerator.num_processes
    batches_per_epoch = len(batch_positions(len(train_rows), cfg.batch_size, cfg.seed, 0, rank, world))
    per_epoch = steps_per_epoch(batches_per_epoch, cfg.grad_accum)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * per_epoch))
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay)
    scheduler = build_scheduler(optimizer, cfg.lr_scheduler, total_steps, cfg.warmup_ratio)
    _, compiled = compiling.configure(model, cfg.compile, total_steps, accelerator.device,
                                      is_sharded(accelerator) or zero.is_deepspeed(accelerator))

    # The data position (epoch, index of the next micro-batch) is what makes a resume continue mid-epoch.
    state = {"step": 0, "epoch": 0, "index": 0, "tokens": 0, "train_seconds": 0.0, "step_seconds": 0.0}
    if checkpoint is not None:
        state = resume_state(checkpoint, optimizer, scheduler, accelerator)
        log(f"resuming from {checkpoint} (step {state['step']})")
        if state.get("total_steps", total_steps) != total_steps:
            log(f"the run now has {total_steps} steps instead of {state['total_steps']}: the lr schedule continues "
                "from the checkpoint's position, not from a schedule planned for the new length")
    state["total_steps"] = total_steps
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)  # before ZeRO-3 partitions them
    model, optimizer = prepare(model, optimizer, accelerator, cfg.batch_size, cfg.max_grad_norm)
    sparse_lookup.configure(model, accelerator)
    if checkpoint is not None:
        load_partitioned_optimizer_state(checkpoint, model, optimizer, accelerator)
    model.train()
    metrics = (MetricsLog(out / "metrics.jsonl", keep_until_step=state["step"], tracking=open_tracking(cfg, out))
               if is_main else None)
    log(f"{len(train_rows)} training rows, {len(eval_rows)} eval rows, {total_steps} steps, "
        f"global batch {cfg.batch_size} x {world} processes x {cfg.grad_accum} accumulation "
        f"({describe(accelerator)}), "
        f"{trainable:,} trainable parameters, precision {accelerator.mixed_precision}, "
        f"layout {resolve_layout(cfg.layout, accelerator.device)}, activation checkpointing {recompute}, "
        f"compile {compiled}")
    if tail := describe_tail(len(train_rows), cfg.batch_size, world):
        log(tail)

    pad_id = tokenizer.pad_token_id
    stream = step_stream(train_rows, cfg, state["epoch"], state["index"], rank, world)
    progress = tqdm(total=total_steps, initial=state["step"], disable=not is_main, desc="sft", unit="step",
                    dynamic_ncols=True)
    window = Window()
    last_loss = None
    eval_result: dict = {}
    train_start = time.time() - state["train_seconds"]
    guard = NonFiniteGuard(cfg.max_bad_steps)
    with StopOnSignal() as stop:
        while state["step"] < total_steps:
            step_batches, weight, epoch, index = next(stream)
            step_began = time.time()
            step_nll, step_tokens, grad_norm, lr, applied = train_step(
                model, optimizer, scheduler, step_batches, weight, cfg, pad_id, accelerator, guard, state["step"] + 1)
            last_loss = step_nll / step_tokens
            state.update(step=state["step"] + 1, epoch=epoch, index=index, tokens=state["tokens"] + step_tokens,
                         loss=last_loss)
            window.add({"loss": last_loss}, step_tokens, {"tokens": step_tokens}, time.time() - step_began, applied)
            state["step_seconds"] += time.time() - step_began
            step = state["step"]
            progress.update(1)
            if step % cfg.logging_steps == 0 or step == total_steps:
                row = {"step": step, "epoch": round(step / per_epoch, 4), **window.row(), "lr": lr,
                       "grad_norm": grad_norm, "elapsed_s": round(time.time() - train_start, 2)}
                if metrics:
                    metrics.write(row)
                progress.set_postfix(loss=f"{float('nan') if row['loss'] is None else row['loss']:.4f}", lr=f"{lr:.2e}",
                                     tok_s=f"{row['tokens_per_s']:.0f}")
                window = Window()
            if eval_rows and ((cfg.eval_steps and step % cfg.eval_steps == 0) or step == total_steps):
                eval_result = evaluate(model, eval_rows, cfg, pad_id, accelerator)
                if metrics:
                    metrics.write({"step": step, "epoch": round(step / per_epoch, 4), **eval_result})
                progress.write(f"step {step}: eval loss {eval_result['eval/loss']:.4f}")
            due = (cfg.save_steps and step % cfg.save_steps == 0) or (cfg.save_last and step == total_steps)
            stopping = agree_on_stop(stop, accelerator)
            threads.adjust()  # another run may have started or ended on this machine
            if (due and guard.in_a_row == 0) or stopping:  # never checkpoint in the middle of a NaN streak
                state["train_seconds"] = time.time() - train_start
                save_step(out, step, model, tokenizer, optimizer, scheduler, state, cfg.save_total_limit, accelerator)
            if stopping:
                progress.close()
                raise interrupt(stop, step, out)
    progress.close()
    train_seconds = time.time() - train_start
    final = save_final(model, tokenizer, out, accelerator)

    summary = {
        "final_loss": state.get("loss"),
        "steps": state["step"],
        "trained_tokens": state["tokens"],
        "tokens_per_s": round(state["tokens"] / max(state["step_seconds"], 1e-9), 1),
        "peak_memory_mib": round(peak_memory_mib(accelerator.device), 1),
        "rows": {"used": len(train_rows), "eval": len(eval_rows), "truncated": stats.truncated,
                 "dropped": stats.dropped, "skipped": stats.skipped, "skipped_examples": stats.skipped_rows,
                 "repaired": stats.repaired, "repaired_examples": stats.repaired_rows},
        "sources": sources,
        "skipped_steps": guard.skipped,
        "train_seconds": round(train_seconds, 2),
        "wall_seconds": round(time.time() - started, 2),
        **eval_result,
        "output_dir": str(out),
        "final": str(final),
    }
    if is_main:
        metrics.close()
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        log(f"done: {state['step']} steps, final loss {last_loss}, {summary['tokens_per_s']} tokens/s; "
            f"model in {final}")
    release_run_folder(out)
    hf_logging.enable_progress_bar()
    return summary, accelerator.unwrap_model(model), tokenizer

