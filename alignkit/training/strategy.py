"""How several processes share a model: DDP (every process holds it all) or FSDP2 (each holds a shard).

Both come from accelerate. `strategy: fsdp` (or `accelerate launch` with an FSDP config, which sets
ACCELERATE_USE_FSDP) builds accelerate's FullyShardedDataParallelPlugin: FSDP2, full shard, decoder layers as
the sharding units, full state dicts on save. accelerate only turns FSDP on for GPU-like devices; torch's
`fully_shard` itself works on CPU over gloo, so on a CPU launch the same plugin is put in place by hand
(`_fsdp_on_cpu`), which is what lets the FSDP path be tested on a machine without a GPU. A DeepSpeed launch
(ZeRO-2/3) goes through `training.zero`; the functions below dispatch to it.
"""

from __future__ import annotations

import contextlib
import os

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

from alignkit.errors import UserError
from alignkit.training import zero
from alignkit.training.compiling import decoder_layers


def wants_fsdp(strategy: str) -> bool:
    """fsdp asked for by the config, or by the launcher (`accelerate launch --config_file fsdp.yaml`)."""
    if strategy != "auto":
        return strategy == "fsdp"
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


# what fsdp_plugin() builds, as accelerate launch names it in the environment (from an FSDP config file)
FIXED_FSDP_SETTINGS = {"FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "true", "FSDP_OFFLOAD_PARAMS": "false",
                       "FSDP_ACTIVATION_CHECKPOINTING": "false"}


def fsdp_plugin() -> FullyShardedDataParallelPlugin:
    """FSDP2, parameters, gradients and optimizer state all sharded, resharded after each forward.

    Built here rather than from a launcher's settings: the sharded reference, the padded passes and the
    gathered saves are written for exactly this plugin. A launcher asking for something else is refused."""
    asked = {name: os.environ[name].lower() for name in FIXED_FSDP_SETTINGS if name in os.environ}
    differing = [f"{name}={value}" for name, value in asked.items() if value != FIXED_FSDP_SETTINGS[name]]
    if differing:
        raise UserError(f"alignkit's FSDP is FSDP2, full shard, resharded after forward, no offload, no activation "
                        f"checkpointing; the launch asks for {', '.join(differing)}: use configs/accelerate/fsdp.yaml")
    return FullyShardedDataParallelPlugin(fsdp_version=2, reshard_after_forward=True,
                                          auto_wrap_policy="transformer_based_wrap",
                                          state_dict_type="FULL_STATE_DICT", cpu_ram_efficient_loading=False)


def build_accelerator(mixed_precision: str, strategy: str, dtype: str = "auto") -> Accelerator:
    """An Accelerator for the strategy; a single process never shards (there is nothing to share with)."""
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if zero.wants_deepspeed() and several:
        return zero.build_deepspeed_accelerator(dtype, strategy)
    os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)  # one process: accelerate would still start an engine
    cpu = not torch.cuda.is_available()
    fsdp = wants_fsdp(strategy) and several
    if not fsdp:
        if strategy == "ddp":  # the config wins over a launcher's FSDP setting
            os.environ.pop("ACCELERATE_USE_FSDP", None)
        return Accelerator(mixed_precision=mixed_precision, cpu=cpu)
    plugin = fsdp_plugin()
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=cpu, fsdp_plugin=plugin)
    if accelerator.distributed_type == DistributedType.MULTI_CPU:
        _fsdp_on_cpu(accelerator, plugin, mixed_precision)
    return accelerator


def describe(accelerator: Accelerator) -> str:
    """The strategy as the start-up log states it."""
    if accelerator.num_processes == 1:
        return "single process"
    if zero.is_deepspeed(accelerator):
        return f"deepspeed zero-{zero.zero_stage(accelerator)}"
    return "fsdp (full shard)" if is_sharded(accelerator) else "ddp"


def _fsdp_on_cpu(accelerator: Accelerator, plugin: FullyShardedDataParallelPlugin, mixed_precision: str) -> None:
    """accelerate keeps MULTI_CPU on CPU whatever the plugin says; its FSDP2 code path is device-agnostic.

    Set where accelerate itself sets it on a GPU: in both shared states (AcceleratorState copies PartialState's
    type whenever it is constructed again, as `prepare` does)."""
    state = accelerator.state
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    if mixed_precision != "no":
        plugin.set_mixed_precision(mixed_precision)
    state.fsdp_plugin = plugin


def is_sharded(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.FSDP


def prepare(model, optimizer, accelerator: Accelerator, micro_batch: int, max_grad_norm: float):
    """accelerate's `prepare` of the policy and its optimizer; DeepSpeed's engine takes the clipping norm."""
    if zero.is_deepspeed(accelerator):
        return zero.prepare(model, optimizer, accelerator, micro_batch, max_grad_norm)
    return accelerator.prepare(model, optimizer)


def autocast_region(accelerator: Accelerator):
    """Mixed-precision autocast around all forward and backward passes of a step (and of evaluation and reference
    scoring, so every log-prob is computed alike), rather than around each forward pass alone.

    Two effects, both measured in docs/performance.md: the output head and the log-prob chunks, which run outside
    the model's forward, are computed in bf16 like the rest of the model (as inside a transformers forward, which
    is what TRL runs); and autocast's cache of bf16 weight casts, which lives until the outermost region ends,
    serves every pass of the step, so the trained weights are cast once per step instead of once per pass (the
    cast keeps no tensors for its backward, so each pass's backward can run through the cached cast). Not under
    FSDP, whose parameters are gathered afresh for each pass."""
    if accelerator.mixed_precision == "no" or is_sharded(accelerator):
        return contextlib.nullcontext()
    return accelerator.autocast()


def backward(model, loss: torch.Tensor, last: bool, accelerator: Accelerator) -> None:
    """One backward pass of a step; `last` marks the step's final pass (DeepSpeed must be told)."""
    if zero.is_deepspeed(accelerator):
        zero.backward(model, loss, last)
    else:
        accelerator.backward(loss)


def optimizer_step(model, optimizer, max_grad_norm: float, accelerator: Accelerator, approve) -> tuple[float, bool]:
    """Clip to max_grad_norm (0: measure only), ask `approve(grad_norm)` (the non-finite guard) and update.

    Returns (grad norm before clipping, applied). Under DeepSpeed the engine clips, measures and skips itself."""
    if zero.is_deepspeed(accelerator):
        return zero.step(model, approve)
    params = [p for p in model.parameters() if p.requires_grad]
    norm = clip_gradients(params, max_grad_norm if max_grad_norm > 0 else float("inf"), accelerator)
    applied = approve(norm)
    if applied:
        optimizer.step()
    return norm, applied


def full_state_dict(model, accelerator: Accelerator) -> dict | None:
    """The whole model's weights for saving: gathered from the shards (a collective every process must join)
    under FSDP and ZeRO-3; None otherwise, meaning the model's own state dict is already whole."""
    if zero.is_deepspeed(accelerator):
        return zero.gathered_state_dict(model, accelerator)
    if not is_sharded(accelerator):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    gathered = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # own storage for each tensor: safetensors cannot read the views the gather hands back on CPU
    return {name: tensor.detach().clone() for name, tensor in gathered.items()}


def eval_model(model, accelerator: Accelerator):
    """The model evaluation passes go through. Under DDP, the module inside the wrapper: no gradient flows, and
    the wrapper's forward broadcasts buffers, which would leave processes with different numbers of eval rows
    out of step. Under DeepSpeed, the module inside the engine (ZeRO-3's gathering hooks sit on the module; its
    passes are padded to equal counts). Under FSDP, the sharded model itself (padded likewise)."""
    return model if is_sharded(accelerator) else getattr(model, "module", model)


def equal_passes(items: list, filler, accelerator: Accelerator) -> list[tuple[object, float]]:
    """(forward-pass input, loss weight) pairs, padded with weight-0 `filler` passes so that every process
    runs as many passes as the busiest one.

    Under FSDP and ZeRO-3 every forward and backward pass all-gathers parameters, and ZeRO-2 reduces gradients
    in every backward pass, so a process with one pass fewer would leave the others waiting; DDP synchronises
    once per step and needs no padding."""
    weighted = [(item, 1.0) for item in items]
    if not (is_sharded(accelerator) or zero.is_deepspeed(accelerator)):
        return weighted
    counts = accelerator.gather(torch.tensor([len(items)], device=accelerator.device))
    return weighted + [(filler, 0.0)] * (int(counts.max().item()) - len(items))


def clip_gradients(params: list, max_norm: float, accelerator: Accelerator) -> float:
    """Clip to `max_norm` (inf: measure only) and return the global gradient norm.

    Under FSDP the parameters are DTensors and torch's clip computes the norm over all shards. accelerate's own
    FSDP branch compares the list with every prepared model's parameters and fails (mixed Tensor and DTensor)
    when a frozen model such as the DPO reference has been prepared too, so it is bypassed here."""
    if is_sharded(accelerator):
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    return float(accelerator.clip_grad_norm_(params, max_norm))


def shard_frozen(model: torch.nn.Module) -> torch.nn.Module:
    """Shard a frozen model (the DPO reference) like the policy: each decoder layer, then the whole.

    accelerate's FSDP2 `prepare` wants a model with its optimizer, so the frozen one is sharded with torch's
    `fully_shard` directly; every forward pass then all-gathers one layer at a time, as the policy's do."""
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(model):
        fully_shard(layer)
    fully_shard(model)
    return model


def full_training_state(model, optimizer, accelerator: Accelerator) -> tuple[dict | None, dict | None] | None:
    """(full weights, full optimizer state) gathered from the shards for a checkpoint; None under DDP.

    A collective: every process must call it. The optimizer state is keyed by parameter names. Under DeepSpeed
    the optimizer state stays partitioned (`training.zero.save_engine_state`): (weights or None, None)."""
    if zero.is_deepspeed(accelerator):
        return zero.gathered_state_dict(model, accelerator), None
    if not is_sharded(accelerator):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return full_state_dict(model, accelerator), get_optimizer_state_dict(model, _inner(optimizer), options=options)


def load_partitioned_optimizer_state(checkpoint, model, optimizer, accelerator: Accelerator) -> None:
    """After `prepare`: the checkpoint's optimizer state into the FSDP shards or DeepSpeed partitions (DDP's
    was loaded before `prepare`)."""
    if zero.is_deepspeed(accelerator):
        zero.load_engine_state(model, checkpoint / "deepspeed")
    elif is_sharded(accelerator):
        load_full_optimizer_state(checkpoint / "optimizer.pt", model, optimizer)


def load_full_optimizer_state(path, model, optimizer) -> None:
    """Load a checkpoint's full optimizer state into the sharded optimizer, each process keeping its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    state = torch.load(path, weights_only=True)
    set_optimizer_state_dict(model, _inner(optimizer), state, options=StateDictOptions(full_state_dict=True))


def _inner(optimizer):
    """The torch optimizer inside accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)
