"""The distributed back end: how this run's processes share the work, decided once and asked everywhere.

One process, DDP, FSDP2 (full shard) or DeepSpeed ZeRO-2/3, all built by accelerate (`training.strategy`,
`training.zero`). The training loop and the objectives never ask which one runs: they call `prepare`,
`autocast`, `backward`, `step`, `eval_model`, `equal_passes`, `frozen` and the state gatherers here.
"""

from __future__ import annotations

import contextlib
import gc
import warnings
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from alignkit.errors import UserError
from alignkit.models import file_pages
from alignkit.training import kernel_caches, strategy, threads, zero


class Backend:
    """The accelerator of a run and everything that depends on how its processes share the model."""

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator
        self.deepspeed = zero.is_deepspeed(accelerator)
        self.sharded = strategy.is_sharded(accelerator)

    @classmethod
    def build(cls, dtype: str, strategy_name: str = "auto") -> Backend:
        # transformers 5 warns on every peft model about a renamed attribute peft still reads; not ours to act on
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        # peft looks for config.json beside an adapter's base to see if the vocabulary grew; a LoRA stage trained
        # on a LoRA stage's output has an adapter folder as its base, whose vocabulary is the base's
        warnings.filterwarnings("ignore", message="Could not find a config file in .* vocabulary was not modified",
                                category=UserWarning)
        # accelerate keeps its precision in a process-wide singleton; reset it so one process can run several
        # recipes in a row (the Python API, pipelines), while keeping the process group of a distributed launch.
        AcceleratorState._reset_state()
        accelerator = strategy.build_accelerator(mixed_precision(dtype), strategy_name, dtype)
        kernel_caches.bound()  # for the Python API; the command line sets it first thing
        threads.register()
        return cls(accelerator)

    # ------------------------------------------------------------ who and where

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def partitioned(self) -> bool:
        """Parameters (FSDP, ZeRO-3) or gradients (ZeRO-2) live in shards: every pass is a collective, compiled
        graphs and sparse gradients are not used."""
        return self.sharded or self.deepspeed

    @property
    def half(self) -> bool:
        return self.accelerator.mixed_precision == "bf16"

    def describe(self) -> str:
        """The strategy as the start-up log states it."""
        if self.world == 1:
            return "single process"
        if self.deepspeed:
            return f"deepspeed zero-{zero.zero_stage(self.accelerator)}"
        return "fsdp (full shard)" if self.sharded else "ddp"

    # ------------------------------------------------------------ training

    def prepare(self, model, optimizer, micro_batch: int, max_grad_norm: float):
        """accelerate's `prepare` of the policy and its optimizer; DeepSpeed's engine takes the clipping norm."""
        if self.deepspeed:
            return zero.prepare(model, optimizer, self.accelerator, micro_batch, max_grad_norm)
        return self.accelerator.prepare(model, optimizer)

    def autocast(self):
        """Mixed-precision autocast around all forward and backward passes of a step (and of evaluation and
        reference scoring, so every log-prob is computed alike), rather than around each forward pass alone.

        The output head and the log-prob chunks, which run outside the model's forward, are then computed in
        bf16 like the rest of the model (as inside a transformers forward, which is what TRL runs); and
        autocast's cache of bf16 weight casts, which lives until the outermost region ends, serves every pass of
        the step, so the trained weights are cast once per step instead of once per pass. Not under FSDP, whose
        parameters are gathered afresh for each pass (docs/performance.md)."""
        if not self.half or self.sharded:
            return contextlib.nullcontext()
        return self.accelerator.autocast()

    def no_sync(self, model, last: bool):
        """Gradients are reduced over processes once per step, in the backward pass of its last forward pass."""
        return contextlib.nullcontext() if last else self.accelerator.no_sync(model)

    def backward(self, model, loss: torch.Tensor, last: bool) -> None:
        """One backward pass of a step; `last` marks the step's final pass (DeepSpeed must be told)."""
        if self.deepspeed:
            zero.backward(model, loss, last)
        else:
            self.accelerator.backward(loss)

    def step(self, model, optimizer, max_grad_norm: float, approve) -> tuple[float, bool]:
        """Clip to max_grad_norm (0: measure only), ask `approve(grad_norm)` (the non-finite guard) and update.

        Returns (grad norm before clipping, applied). Under DeepSpeed the engine clips, measures and skips."""
        if self.deepspeed:
            return zero.step(model, approve)
        params = [p for p in model.parameters() if p.requires_grad]
        max_norm = max_grad_norm if max_grad_norm > 0 else float("inf")
        norm = strategy.clip_fsdp_gradients(params, max_norm) if self.sharded else float(
            self.accelerator.clip_grad_norm_(params, max_norm))
        applied = approve(norm)
        if applied:
            optimizer.step()
        return norm, applied

    def equal_passes(self, units: list, filler) -> list[tuple[object, float]]:
        """(forward-pass input, loss weight) pairs, padded with weight-0 `filler` passes where processes must run
        as many passes as each other.

        Under FSDP and ZeRO-3 every forward and backward pass all-gathers parameters, and ZeRO-2 reduces
        gradients in every backward pass, so a process with one pass fewer would leave the others waiting. DDP
        synchronises once per step, in a backward pass: a process left without rows (the short last global
        batch of an epoch, or of the eval rows) still runs one pass, which adds nothing to the loss, gradients
        or metrics, so that every process joins the same reductions."""
        weighted = [(unit, 1.0) for unit in units]
        if self.partitioned:
            counts = self.accelerator.gather(torch.tensor([len(units)], device=self.device))
            return weighted + [(filler, 0.0)] * (int(counts.max().item()) - len(units))
        return weighted or ([(filler, 0.0)] if self.world > 1 else [])

    def reduce(self, tensor: torch.Tensor, how: str = "sum") -> torch.Tensor:
        return self.accelerator.reduce(tensor, how)

    # ------------------------------------------------------------ other models

    def eval_model(self, model):
        """The model evaluation passes go through. Under DDP, the module inside the wrapper: no gradient flows,
        and the wrapper's forward broadcasts buffers, which would leave processes with different numbers of
        eval rows out of step. Under DeepSpeed, the module inside the engine (ZeRO-3's gathering hooks sit on
        the module; its passes are padded to equal counts). Under FSDP, the sharded model itself."""
        return model if self.sharded else getattr(model, "module", model)

    def frozen(self, model: torch.nn.Module) -> torch.nn.Module:
        """Place a frozen model (a DPO reference) beside the policy.

        Under FSDP and ZeRO-3 it is partitioned like the policy (no gradients, no optimizer state), so it costs
        each process 1/N of a model; otherwise each process holds a whole copy."""
        model.requires_grad_(False)
        model.eval()
        if self.deepspeed:
            return zero.frozen_reference(model, self.accelerator)
        if self.sharded:
            model = strategy.shard_frozen(model.to(self.device))
        elif self.half:
            store_linear_weights_in_bf16(model)
        return self.accelerator.prepare_model(model, evaluation_mode=True)

    def release(self, model) -> None:
        """Let go of a model placed with `frozen` (accelerate keeps a reference to every prepared model)."""
        if model is None:
            return
        models = self.accelerator._models
        models[:] = [m for m in models if m is not model]
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def unwrap(self, model):
        return self.accelerator.unwrap_model(model)

    # ------------------------------------------------------------ saving and resuming

    def full_state_dict(self, model) -> dict | None:
        """The whole model's weights for saving: gathered from the shards (a collective every process must join)
        under FSDP and ZeRO-3; None otherwise, meaning the model's own state dict is already whole."""
        if self.deepspeed:
            return zero.gathered_state_dict(model, self.accelerator)
        return strategy.full_fsdp_state_dict(model) if self.sharded else None

    def full_training_state(self, model, optimizer) -> tuple[dict | None, dict | None] | None:
        """(full weights, full optimizer state) gathered from the shards for a checkpoint; None under DDP.

        A collective. Under DeepSpeed the optimizer state stays partitioned (`write_engine_state`)."""
        if self.deepspeed:
            return zero.gathered_state_dict(model, self.accelerator), None
        return strategy.full_fsdp_training_state(model, optimizer) if self.sharded else None

    def write_engine_state(self, model, folder: Path) -> Path | None:
        """Under DeepSpeed every process writes its optimizer partition to `folder`; None elsewhere."""
        if not self.deepspeed:
            return None
        zero.save_engine_state(model, folder)
        self.accelerator.wait_for_everyone()
        return folder

    def layout_of_checkpoints(self) -> dict:
        """What a checkpoint records of the back end that wrote it (its optimizer state's layout)."""
        return {"sharded": self.sharded, "deepspeed": self.deepspeed}

    def check_resumable(self, checkpoint: Path, saved: dict) -> bool:
        """Refuse a checkpoint whose optimizer state this back end cannot read; True when that state can only be
        loaded after `prepare` (`load_partitioned_optimizer_state`)."""
        sharded, deepspeed = saved.get("sharded", False), saved.get("deepspeed", False)
        if sharded != self.sharded:
            raise UserError(f"{checkpoint}: saved by a run {'with' if sharded else 'without'} FSDP; resume it with "
                            f"{'strategy: fsdp and several processes' if sharded else 'strategy: ddp'}")
        if deepspeed != self.deepspeed:
            raise UserError(f"{checkpoint}: saved by a run {'with' if deepspeed else 'without'} DeepSpeed; resume "
                            f"it {'under the same DeepSpeed launch' if deepspeed else 'without DeepSpeed'}")
        return sharded or deepspeed

    def load_partitioned_optimizer_state(self, checkpoint: Path, model, optimizer) -> None:
        """After `prepare`: the checkpoint's optimizer state into the FSDP shards or DeepSpeed partitions (DDP's
        was loaded before `prepare`)."""
        if self.deepspeed:
            zero.load_engine_state(model, checkpoint / "deepspeed")
        elif self.sharded:
            strategy.load_full_optimizer_state(checkpoint / "optimizer.pt", model, optimizer)


def mixed_precision(dtype: str) -> str:
    """accelerate's mixed_precision for our `dtype` choice: bf16 autocast over fp32 weights where it is fast."""
    if dtype != "auto":
        return "no"
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "no"


def store_frozen_linears_in_bf16(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Under LoRA and bf16 autocast, store the frozen linear layers (the base under the adapters, an untied output
    head) in bf16, as `store_linear_weights_in_bf16` does for a frozen reference; the layers it changed.

    Autocast would cast each of these weights to bf16 in every pass anyway (it caches casts of trained weights
    only), and a LoRA layer's backward keeps that cast for its input gradient, so storing them in bf16 halves
    their memory, removes the casts and computes exactly what the fp32 weights computed under autocast.
    `restore_fp32` undoes it when training ends."""
    embedding = model.get_input_embeddings().weight
    frozen = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.weight is not embedding
              and m.weight.dtype == torch.float32 and not any(p.requires_grad for p in m.parameters())]
    mappings = file_pages.private_file_mappings()
    for module in frozen:
        _to_bf16(module, mappings)
    _release_file_pages(model, mappings)
    return frozen


def restore_fp32(modules: list[torch.nn.Module]) -> None:
    """The layers `store_frozen_linears_in_bf16` changed, in fp32 again (holding the bf16 values training used),
    so that the trained model runs with or without autocast."""
    for module in modules:
        module.to(torch.float32)


def store_linear_weights_in_bf16(model: torch.nn.Module) -> None:
    """Keep a frozen model's linear layers in bf16, the dtype bf16 autocast casts them to at every call anyway.

    Autocast caches its bf16 copies of trained weights only, so a frozen fp32 weight is cast anew in every
    forward pass; a weight already in bf16 goes into the same matmul unchanged. The reference's log-probs stay
    bit-identical (`tests/test_dpo.py`) while its linear layers take half the memory and no casting time. The
    token embedding, and an output head tied to it, stay fp32: a lookup is not autocast, and its fp32 output
    starts the residual stream."""
    embedding = model.get_input_embeddings().weight
    mappings = file_pages.private_file_mappings()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.weight is not embedding:
            _to_bf16(module, mappings)
    _release_file_pages(model, mappings)


def _release_file_pages(model: torch.nn.Module, mappings: list[tuple[int, int]]) -> None:
    """The fp32 tensors left still point into the safetensors file's memory map, which would keep every page of
    the file read so far resident: each is copied out and its pages handed back, and once the last one is the
    map closes."""
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.dtype == torch.float32:
            mapped, tensor.data = tensor.data, tensor.data.clone()
            file_pages.forget(mapped, mappings)


def _to_bf16(module: torch.nn.Module, mappings: list[tuple[int, int]]) -> None:
    """`module.to(torch.bfloat16)`, the pages of the model file under its fp32 tensors handed back one module at
    a time (`models.file_pages`): otherwise converting every layer reads the whole file into memory first."""
    mapped = [t.data for t in [*module.parameters(), *module.buffers()] if t.dtype == torch.float32]
    module.to(torch.bfloat16)
    for tensor in mapped:
        file_pages.forget(tensor, mappings)
