"""The DPO recipe: set up (policy, reference, pairs) → train loop → checkpoint, in one file.

Each pair's chosen and rejected sequences go through the policy in one forward pass (stacked in the batch).
Loss of a step: Σ_k w_k · mean over the step's pairs of loss_k (see `alignkit.losses.dpo`); the `sft` term is
the mean token NLL over the step's chosen tokens. Metrics (TRL's names): rewards/chosen = mean β(ℓθ − ℓref) of
the chosen completions (ℓref = 0 without a reference), rewards/rejected likewise, rewards/margins = their mean
difference, rewards/accuracies = fraction of pairs whose chosen reward beats the rejected one, logps/chosen and
logps/rejected = mean ℓθ, pairs = pairs in the step, tokens = non-padding tokens the policy read in the step.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers.utils import logging as hf_logging

from alignkit.config import REFERENCE_FREE, DPOConfig, save_yaml
from alignkit.data.batches import batch_positions
from alignkit.data.cache import load_pair_rows
from alignkit.data.mixture import load_mixture, log_mixture
from alignkit.data.prefs import PreferenceRow
from alignkit.data.sources import file_fingerprint
from alignkit.data.store import StoredRows, lengths, trained_counts
from alignkit.data.tokenize import PLAIN, Rendering
from alignkit.errors import UserError
from alignkit.losses import pair_losses
from alignkit.losses.dpo import nll_loss
from alignkit.models.embedded import cache_root, log
from alignkit.models.load import build_policy, load_model, resolve_model
from alignkit.training import checkpointing, compiling, sparse_lookup, threads, zero
from alignkit.training.checkpoint import latest_checkpoint
from alignkit.training.forward import pair_logps
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
    shard_frozen,
)
from alignkit.training.tracking import open_tracking

METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected")


# ---------------------------------------------------------------- set-up

def reference_kind(cfg: DPOConfig) -> str:
    if cfg.reference != "auto":
        return cfg.reference
    if set(cfg.loss_type) <= REFERENCE_FREE:
        return "none"
    return "adapter" if cfg.lora and cfg.ref_model is None else "copy"


@dataclass
class Reference:
    """How reference log-probs are obtained: a frozen model, the policy without its adapter, stored, or none."""

    kind: str  # copy | adapter | precomputed | none
    model: torch.nn.Module | None = None


def load_pairs(paths: list[str], tokenizer, template: str, max_length: int, on_bad_row: str = "error",
               num_proc: int | None = None, rendering: Rendering = PLAIN) -> tuple[Sequence, dict]:
    pairs, stats, cached = load_pair_rows(paths, tokenizer, template, max_length, on_bad_row, num_proc, rendering)
    if cached:
        log(f"{', '.join(paths)}: tokenised pairs loaded from cache")
    if stats.skipped:
        log(f"skipped {stats.skipped} bad rows (on_bad_row: skip), e.g. {stats.skipped_rows[0]}")
    if stats.identical:
        log(f"dropped {stats.identical} rows whose chosen equals rejected")
    if stats.dropped:
        log(f"dropped {stats.dropped} pairs whose prompt alone fills max_length={max_length} "
            f"(e.g. {', '.join(stats.dropped_origins[:3])})")
    return pairs, {"pairs": stats.pairs, "identical": stats.identical, "truncated": stats.truncated,
                   "dropped": stats.dropped, "skipped": stats.skipped, "skipped_examples": stats.skipped_rows}


def load_training_pairs(cfg: DPOConfig, tokenizer, template: str) -> tuple[Sequence, dict, list[dict]]:
    """Pairs drawn from the data sources (see `alignkit.data.mixture`), merged statistics, a row per source."""
    pairs, source_stats, sources = load_mixture(
        cfg.data, cfg.mix_total, cfg.seed,
        lambda path: load_pairs([path], tokenizer, template, cfg.max_length, cfg.on_bad_row, cfg.num_proc,
                                Rendering.of(cfg)),
        pair_tokens)
    stats = {name: sum((part[name] for part in source_stats), [] if isinstance(value, list) else 0)
             for name, value in source_stats[0].items()}
    log_mixture(sources, "pairs")
    return pairs, stats, sources


def pair_tokens(pairs: Sequence) -> int:
    """Trained (scored) tokens of both answers."""
    return int(trained_counts(pairs).sum())


def longest_forward(pairs: Sequence, cfg: DPOConfig) -> int:
    """Tokens in the largest forward pass the layout makes (what activation memory scales with); a prefix-shared
    sequence holds the prompt once, so chosen + rejected bounds it."""
    sizes = lengths(pairs)
    layout = dpo_layout(cfg)
    if layout == "padded":
        return 2 * cfg.batch_size * int(sizes.max())
    if layout == "prefix_shared":
        return int(sizes.sum(axis=1).max())
    return int(sizes.max())


def dpo_layout(cfg: DPOConfig) -> str:
    """auto: prefix sharing, the fastest layout measured on CPU (and fewer tokens on any device)."""
    return "prefix_shared" if cfg.layout == "auto" else cfg.layout


@torch.no_grad()
def reference_logps(reference: Reference, model, pairs: list[PreferenceRow], layout: str, pad_id: int, device
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    if reference.kind == "none":
        zeros = torch.zeros(len(pairs), device=device)
        return zeros, zeros
    if reference.kind == "precomputed":
        stored = torch.tensor([p.ref_logps for p in pairs], device=device, dtype=torch.float32)
        return stored[:, 0], stored[:, 1]
    if reference.kind == "copy":
        return pair_logps(reference.model, pairs, layout, pad_id, device)[:2]
    # the policy with its LoRA adapter switched off is the initial model; eval mode turns dropout off.
    # No gradient flows here, so the model inside a DDP wrapper can be called directly.
    inner = getattr(model, "module", model)
    was_training = inner.training
    inner.eval()
    with inner.disable_adapter():
        chosen, rejected = pair_logps(inner, pairs, layout, pad_id, device)[:2]
    inner.train(was_training)
    return chosen, rejected


def build_reference(cfg: DPOConfig, model_path: Path, accelerator: Accelerator) -> Reference:
    """The reference: the initial policy reloaded from disk (so a resumed run keeps the same one), or ref_model."""
    kind = reference_kind(cfg)
    adapter_source = cfg.lora and cfg.ref_model is None
    if kind in ("none", "adapter") or (kind == "precomputed" and adapter_source):
        return Reference(kind)
    dtype = torch.bfloat16 if cfg.dtype == "bf16" else torch.float32
    source = resolve_model(cfg.ref_model) if cfg.ref_model is not None else model_path
    ref = load_model(source, dtype, cfg.trust_remote_code)
    ref.requires_grad_(False)
    ref.eval()
    # Under FSDP and ZeRO-3 the reference is partitioned like the policy (frozen: no gradients, no optimizer
    # state), so it costs each process 1/N of a model; otherwise each process holds a whole frozen copy.
    if zero.is_deepspeed(accelerator):
        return Reference(kind, zero.frozen_reference(ref, accelerator))
    if is_sharded(accelerator):
        ref = shard_frozen(ref.to(accelerator.device))
    elif accelerator.mixed_precision == "bf16":
        store_linear_weights_in_bf16(ref)
    return Reference(kind, accelerator.prepare_model(ref, evaluation_mode=True))


def store_linear_weights_in_bf16(model: torch.nn.Module) -> None:
    """Keep a frozen model's linear layers in bf16, the dtype bf16 autocast casts them to at every call anyway.

    Autocast caches its bf16 copies of trained weights only, so a frozen fp32 weight is cast anew in every
    forward pass; a weight already in bf16 goes into the same matmul unchanged. The reference's log-probs stay
    bit-identical (`tests/test_dpo.py`) while its linear layers take half the memory and no casting time. The
    token embedding, and an output head tied to it, stay fp32: a lookup is not autocast, and its fp32 output
    starts the residual stream."""
    embedding = model.get_input_embeddings().weight
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.weight is not embedding:
            module.to(torch.bfloat16)
    # The fp32 tensors left still point into the safetensors file's memory map, which would keep every page of
    # the file read so far resident (the converted weights' fp32 pages included): copied, they let it close.
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.dtype == torch.float32:
            tensor.data = tensor.data.clone()


def precompute(reference: Reference, policy, pair_sets: list[Sequence], cfg: DPOConfig, pad_id: int,
               accelerator: Accelerator, model_path: Path) -> Reference:
    """Score every pair under the reference once (cached on disk), then drop the reference model.

    Each set's log-probs are kept beside its rows (`StoredRows.ref_logps`, one (chosen, rejected) per row), and
    the cache key covers the model, the settings and every pair's tokens and labels."""
    digest = hashlib.sha256()
    for part in (str(model_path), cfg.ref_model or "", file_fingerprint([str(f) for f in model_path.glob("*")]),
                 str(cfg.lora), accelerator.mixed_precision):
        digest.update(part.encode())
    for pairs in pair_sets:
        digest.update(pairs_fingerprint(pairs).encode())
    cache = cache_root() / "reference-logps" / f"{digest.hexdigest()[:24]}.safetensors"
    total = sum(len(pairs) for pairs in pair_sets)
    if cache.is_file():
        stored = load_file(cache)["logps"]
        log("reference log-probs loaded from cache")
    else:
        source = Reference("adapter") if reference.model is None else Reference("copy", reference.model)
        scores = []
        progress = tqdm(total=total, desc="reference log-probs", disable=not accelerator.is_main_process)
        for pairs in pair_sets:
            for start in range(0, len(pairs), cfg.batch_size):
                chunk = [pairs[i] for i in range(start, min(start + cfg.batch_size, len(pairs)))]
                with autocast_region(accelerator):
                    chosen, rejected = reference_logps(source, policy, chunk, dpo_layout(cfg), pad_id,
                                                       accelerator.device)
                scores.append(torch.stack([chosen.float(), rejected.float()], dim=1).cpu())
                progress.update(len(chunk))
        progress.close()
        stored = torch.cat(scores) if scores else torch.zeros((0, 2))
        if accelerator.is_main_process:
            cache.parent.mkdir(parents=True, exist_ok=True)
            save_file({"logps": stored.contiguous()}, str(cache))
    start = 0
    for pairs in pair_sets:
        attach_reference(pairs, stored[start:start + len(pairs)])
        start += len(pairs)
    return Reference("precomputed")


def pairs_fingerprint(pairs: Sequence) -> str:
    """Identifies the pairs' tokens and labels, chosen and rejected, in order."""
    if isinstance(pairs, StoredRows):
        return pairs.content_hash()
    digest = hashlib.sha256()
    for p in pairs:
        digest.update(json.dumps([p.chosen.input_ids, p.chosen.labels, p.rejected.input_ids,
                                  p.rejected.labels]).encode())
    return digest.hexdigest()


def attach_reference(pairs: Sequence, logps: torch.Tensor) -> None:
    """Give each pair its reference log-probs: stored rows keep them as one tensor, listed pairs each."""
    if isinstance(pairs, StoredRows):
        pairs.ref_logps = logps
    else:
        for pair, values in zip(pairs, logps.tolist(), strict=True):
            pair.ref_logps = tuple(values)


# ---------------------------------------------------------------- the loop's parts

def pair_metrics(cfg: DPOConfig, policy_c, policy_r, ref_c, ref_r) -> dict[str, torch.Tensor]:
    """Per-pair metric values (summed over pairs by the caller, then divided by the pair count)."""
    chosen_rewards = cfg.beta * (policy_c - ref_c).detach()
    rejected_rewards = cfg.beta * (policy_r - ref_r).detach()
    return {"rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
            "rewards/margins": chosen_rewards - rejected_rewards,
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
            "logps/chosen": policy_c.detach(), "logps/rejected": policy_r.detach()}


def batch_loss(model, reference: Reference, pairs: list[PreferenceRow], cfg: DPOConfig, pad_id: int,
               step_pairs: float, step_chosen_tokens: float, device) -> tuple[torch.Tensor, dict, int]:
    """These pairs' share of the step loss, their metric sums and the tokens the policy read."""
    layout = dpo_layout(cfg)
    policy_c, policy_r, len_c, len_r, tokens = pair_logps(model, pairs, layout, pad_id, device)
    ref_c, ref_r = reference_logps(reference, model, pairs, layout, pad_id, device)
    weights = cfg.loss_weights or [1.0] * len(cfg.loss_type)
    per_pair = pair_losses(cfg.loss_type, cfg.beta, cfg.label_smoothing, cfg.simpo_gamma, policy_c, policy_r,
                           ref_c, ref_r, len_c, len_r)
    loss = torch.zeros((), device=device)
    for kind, weight in zip(cfg.loss_type, weights, strict=True):
        if kind == "sft":  # the chosen tokens' NLL, normalised over the whole step's chosen tokens
            loss = loss + weight * nll_loss(policy_c, torch.ones_like(policy_c, dtype=torch.bool),
                                            step_chosen_tokens)
        else:
            loss = loss + weight * per_pair[kind].sum() / step_pairs
    sums = {k: v.sum() for k, v in pair_metrics(cfg, policy_c, policy_r, ref_c, ref_r).items()}
    return loss, sums, tokens


def chosen_tokens(pairs: Sequence) -> int:
    return int(trained_counts(pairs)[:, 0].sum()) if len(pairs) else 0


def train_step(model, reference, optimizer, scheduler, step_batches, weight: float, cfg: DPOConfig, pad_id: int,
               accelerator: Accelerator, guard: NonFiniteGuard, step: int) -> dict:
    """One optimizer step; a non-finite loss or gradient norm skips the update (see `training.guard`).

    `weight` 0 marks a filler pair (see `training.run.step_stream`): it runs the passes and counts for nothing."""
    device = accelerator.device
    counts = weight * torch.tensor([float(sum(len(b) for b in step_batches)),
                                    float(sum(chosen_tokens(b) for b in step_batches))], device=device)
    step_pairs, step_chosen_tokens = accelerator.reduce(counts, "sum").clamp(min=1).tolist()
    totals = {name: torch.zeros((), device=device) for name in METRICS}
    tokens = 0
    # Padded: a micro-batch per forward pass. Otherwise one pair per pass, each followed by its backward.
    units = step_batches if dpo_layout(cfg) == "padded" else [[pair] for pairs in step_batches for pair in pairs]
    passes = equal_passes(units, units[0], accelerator)
    with autocast_region(accelerator):
        for i, (pairs, pass_weight) in enumerate(passes):
            last, scale = i == len(passes) - 1, weight * pass_weight
            with contextlib.nullcontext() if last else accelerator.no_sync(model):
                loss, sums, n_tokens = batch_loss(model, reference, pairs, cfg, pad_id, step_pairs, step_chosen_tokens,
                                                  device)
                # DDP and ZeRO average gradients over processes; multiplying by their number restores the sum.
                backward(model, loss * scale * accelerator.num_processes, last, accelerator)
            totals["loss"] += scale * loss.detach()
            for name, value in sums.items():
                totals[name] += scale * value / step_pairs
            tokens += int(scale * n_tokens)
    lr = scheduler.get_last_lr()[0]
    row = {name: accelerator.reduce(value, "sum").item() for name, value in totals.items()}
    grad_norm, applied = optimizer_step(model, optimizer, cfg.max_grad_norm, accelerator,
                                        lambda norm: guard.check(step, row["loss"], norm))
    if not applied:
        row["skipped"] = True
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    tokens = int(accelerator.reduce(torch.tensor(float(tokens), device=device), "sum").item())
    return {**row, "grad_norm": grad_norm, "lr": lr, "pairs": int(step_pairs), "tokens": tokens}


@torch.no_grad()
def evaluate(model, reference: Reference, pairs: Sequence, cfg: DPOConfig, pad_id: int,
             accelerator: Accelerator) -> dict:
    model = eval_model(model, accelerator)
    model.eval()
    shard = list(pairs[accelerator.process_index::accelerator.num_processes])
    total_pairs = float(len(pairs))
    total_chosen = float(max(1, chosen_tokens(pairs)))
    totals = {name: torch.zeros((), device=accelerator.device) for name in METRICS}
    chunks = [shard[start:start + cfg.batch_size] for start in range(0, len(shard), cfg.batch_size)]
    with autocast_region(accelerator):
        for chunk, weight in equal_passes(chunks, [pairs[0]], accelerator):
            loss, sums, _ = batch_loss(model, reference, chunk, cfg, pad_id, total_pairs, total_chosen,
                                       accelerator.device)
            totals["loss"] += weight * loss
            for name, value in sums.items():
                totals[name] += weight * value / total_pairs
    model.train()
    return {f"eval/{name}": accelerator.reduce(value, "sum").item() for name, value in totals.items()}


# ---------------------------------------------------------------- the recipe

def run(cfg: DPOConfig) -> dict:
    """Train and save; returns the summary written to OUTPUT_DIR/summary.json."""
    if wants_relaunch(cfg):
        return relaunch(cfg, "dpo")
    return train(cfg)[0]


@releases_run_folder_on_error
def train(cfg: DPOConfig):
    """Train and save; returns (summary, trained model, tokenizer)."""
    started = time.time()
    accelerator = make_accelerator(cfg.dtype, cfg.strategy)
    is_main = accelerator.is_main_process
    out = check_output_dir(cfg, "dpo", is_main)
    checkpoint = latest_checkpoint(out / "checkpoints") if cfg.resume else None
    set_seed(cfg.seed)

    model_path, tokenizer, template = load_inputs(cfg)
    train_pairs, stats, sources = load_training_pairs(cfg, tokenizer, template)  # one process tokenises at a time
    eval_pairs: Sequence = []
    if cfg.eval_data:
        eval_pairs, _ = load_pairs(cfg.eval_data, tokenizer, template, cfg.max_length, cfg.on_bad_row, cfg.num_proc,
                                   Rendering.of(cfg))
    if not cfg.eval_data:
        train_pairs, eval_pairs = split_eval(train_pairs, cfg.eval_fraction, cfg.seed)
    if not train_pairs:
        raise UserError("no preference pairs left to train on")
    model = build_policy(cfg, model_path, checkpoint)
    # a frozen copy as reference is still to be loaded: its fp32 weights count against the same memory
    reference_bytes = 4.0 * sum(p.numel() for p in model.parameters()) if reference_kind(cfg) == "copy" else 0.0
    recompute = checkpointing.configure(model, cfg.activation_checkpointing, longest_forward(train_pairs, cfg),
                                        accelerator.device, half=accelerator.mixed_precision == "bf16" or
                                        cfg.dtype == "bf16", extra_bytes=reference_bytes)
    claim_output_dir(cfg, out, is_main)
    if is_main:
        save_yaml(cfg, out / "config.yaml")

    pad_id = tokenizer.pad_token_id
    reference = build_reference(cfg, model_path, accelerator)
    if reference.kind == "precomputed":
        model.to(accelerator.device)
        reference = precompute(reference, model, [train_pairs, eval_pairs], cfg, pad_id, accelerator, model_path)

    rank, world = accelerator.process_index, accelerator.num_processes
    per_epoch = steps_per_epoch(len(batch_positions(len(train_pairs), cfg.batch_size, cfg.seed, 0, rank, world)),
                                cfg.grad_accum)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * per_epoch))
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay)
    scheduler = build_scheduler(optimizer, cfg.lr_scheduler, total_steps, cfg.warmup_ratio)
    is_compiled, compiled = compiling.configure(model, cfg.compile, total_steps, accelerator.device,
                                                is_sharded(accelerator) or zero.is_deepspeed(accelerator))
    if is_compiled and reference.model is not None:
        compiling.configure(reference.model, "on", total_steps, accelerator.device, False)
    state = {"step": 0, "epoch": 0, "index": 0, "pairs": 0, "tokens": 0, "train_seconds": 0.0,
             "step_seconds": 0.0}
    if checkpoint is not None:
        state = resume_state(checkpoint, optimizer, scheduler, accelerator)
        log(f"resuming from {checkpoint} (step {state['step']})")
        if state.get("total_steps", total_steps) != total_steps:
            log(f"the run now has {total_steps} steps instead of {state['total_steps']}: the lr schedule continues "
                "from the checkpoint's position, not from a schedule planned for the new length")
    state["total_steps"] = total_steps
    model, optimizer = prepare(model, optimizer, accelerator, cfg.batch_size, cfg.max_grad_norm)
    sparse_lookup.configure(model, accelerator)
    if checkpoint is not None:
        load_partitioned_optimizer_state(checkpoint, model, optimizer, accelerator)
    model.train()
    metrics = (MetricsLog(out / "metrics.jsonl", keep_until_step=state["step"], tracking=open_tracking(cfg, out))
               if is_main else None)
    log(f"{len(train_pairs)} training pairs, {len(eval_pairs)} eval pairs, {total_steps} steps, global batch "
        f"{cfg.batch_size} x {world} processes x {cfg.grad_accum} accumulation ({describe(accelerator)}), "
        f"losses {'+'.join(cfg.loss_type)}, "
        f"beta {cfg.beta}, reference {reference.kind}, precision {accelerator.mixed_precision}, "
        f"layout {dpo_layout(cfg)}, activation checkpointing {recompute}, compile {compiled}")
    if tail := describe_tail(len(train_pairs), cfg.batch_size, world):
        log(tail)

    stream = step_stream(train_pairs, cfg, state["epoch"], state["index"], rank, world)
    progress = tqdm(total=total_steps, initial=state["step"], disable=not is_main, desc="dpo", unit="step",
                    dynamic_ncols=True)
    train_start = time.time() - state["train_seconds"]
    window = Window()
    last: dict = {}
    eval_result: dict = {}
    guard = NonFiniteGuard(cfg.max_bad_steps)
    with StopOnSignal() as stop:
        while state["step"] < total_steps:
            step_batches, weight, epoch, index = next(stream)
            began = time.time()
            last = train_step(model, reference, optimizer, scheduler, step_batches, weight, cfg, pad_id, accelerator,
                              guard, state["step"] + 1)
            seconds = time.time() - began
            state.update(step=state["step"] + 1, epoch=epoch, index=index, pairs=state["pairs"] + last["pairs"],
                         loss=last["loss"], tokens=state["tokens"] + last["tokens"],
                         step_seconds=state["step_seconds"] + seconds)
            window.add({k: last[k] for k in METRICS if k in last}, last["pairs"],
                       {"pairs": last["pairs"], "tokens": last["tokens"]}, seconds, not last.get("skipped"))
            step = state["step"]
            progress.update(1)
            if step % cfg.logging_steps == 0 or step == total_steps:
                row = {"step": step, "epoch": round(step / per_epoch, 4), **window.row(), "lr": last["lr"],
                       "grad_norm": last["grad_norm"], "elapsed_s": round(time.time() - train_start, 2)}
                if metrics:
                    metrics.write(row)
                shown = {k: float("nan") if row.get(k) is None else row[k] for k in METRICS}
                progress.set_postfix(loss=f"{shown['loss']:.4f}", acc=f"{shown['rewards/accuracies']:.2f}",
                                     margin=f"{shown['rewards/margins']:.3f}", lr=f"{last['lr']:.1e}")
                window = Window()
            if eval_pairs and ((cfg.eval_steps and step % cfg.eval_steps == 0) or step == total_steps):
                eval_result = evaluate(model, reference, eval_pairs, cfg, pad_id, accelerator)
                if metrics:
                    metrics.write({"step": step, "epoch": round(step / per_epoch, 4), **eval_result})
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
    final = save_final(model, tokenizer, out, accelerator)
    summary = {
        "final_loss": state.get("loss"),
        **{k: last[k] for k in METRICS[1:] if k in last},
        "steps": state["step"],
        "trained_pairs": state["pairs"],
        "tokens": state["tokens"],
        "pairs_per_s": round(state["pairs"] / max(state["step_seconds"], 1e-9), 3),
        "tokens_per_s": round(state["tokens"] / max(state["step_seconds"], 1e-9), 1),
        "peak_memory_mib": round(peak_memory_mib(accelerator.device), 1),
        "rows": {"used": len(train_pairs), "eval": len(eval_pairs),
                 **{k: v for k, v in stats.items() if k != "pairs"}},
        "sources": sources,
        "reference": reference.kind,
        "skipped_steps": guard.skipped,
        "train_seconds": round(time.time() - train_start, 2),
        "wall_seconds": round(time.time() - started, 2),
        **eval_result,
        "output_dir": str(out),
        "final": str(final),
    }
    if is_main:
        metrics.close()
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        log(f"done: {state['step']} steps, loss {summary['final_loss']}, accuracy "
            f"{summary.get('rewards/accuracies')}, {summary['pairs_per_s']} pairs/s; model in {final}")
    release_run_folder(out)
    hf_logging.enable_progress_bar()
    return summary, accelerator.unwrap_model(model), tokenizer
