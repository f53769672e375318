"""How several processes share a model: DDP (every process holds it all) or FSDP2 (each holds a shard).

Both come from accelerate. `strategy: fsdp` (or `accelerate launch` with an FSDP config, which sets
ACCELERATE_USE_FSDP) builds accelerate's FullyShardedDataParallelPlugin: FSDP2, full shard, decoder layers as
the sharding units, full state dicts on save. accelerate only turns FSDP on for GPU-like devices; torch's
`fully_shard` itself works on CPU over gloo, so on a CPU launch the same plugin is put in place by hand
(`_fsdp_on_cpu`), which is what lets the FSDP path be tested on a machine without a GPU. A DeepSpeed launch
(ZeRO-2/3) goes through `training.zero`. `training.backend.Backend` is what the loop asks.
"""

from __future__ import annotations

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


def full_fsdp_state_dict(model) -> dict:
    """The whole model's weights gathered from the FSDP shards (a collective every process must join)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    gathered = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # own storage for each tensor: safetensors cannot read the views the gather hands back on CPU
    return {name: tensor.detach().clone() for name, tensor in gathered.items()}


def clip_fsdp_gradients(params: list, max_norm: float) -> float:
    """Clip to `max_norm` (inf: measure only) and return the global gradient norm of FSDP's DTensors.

    torch's clip computes the norm over all shards. accelerate's own FSDP branch compares the list with every
    prepared model's parameters and fails (mixed Tensor and DTensor) when a frozen model such as the DPO
    reference has been prepared too, so it is bypassed."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def shard_frozen(model: torch.nn.Module) -> torch.nn.Module:
    """Shard a frozen model (the DPO reference) like the policy: each decoder layer, then the whole.

    accelerate's FSDP2 `prepare` wants a model with its optimizer, so the frozen one is sharded with torch's
    `fully_shard` directly; every forward pass then all-gathers one layer at a time, as the policy's do."""
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(model):
        fully_shard(layer)
    fully_shard(model)
    return model


def full_fsdp_training_state(model, optimizer) -> tuple[dict, dict]:
    """(full weights, full optimizer state keyed by parameter names) gathered from the FSDP shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return full_fsdp_state_dict(model), get_optimizer_state_dict(model, _inner(optimizer), options=options)


def load_full_optimizer_state(path, model, optimizer) -> None:
    """Load a checkpoint's full optimizer state into the sharded optimizer, each process keeping its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    state = torch.load(path, weights_only=True)
    set_optimizer_state_dict(model, _inner(optimizer), state, options=StateDictOptions(full_state_dict=True))


def _inner(optimizer):
    """The torch optimizer inside accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)
