"""DeepSpeed ZeRO-2 / ZeRO-3 through accelerate, driven the way alignkit's loop needs.

A launch asks for DeepSpeed with `accelerate launch --config_file configs/accelerate/deepspeed_zero*.yaml` (or
torchrun with the same ACCELERATE_* variables); accelerate's DeepSpeedPlugin reads them and `accelerator.prepare`
builds the engine. Three things differ from accelerate's usual DeepSpeed loop, all because alignkit runs a varying
number of forward/backward passes per optimizer step and decides itself when a step ends:

- the engine is told which pass ends the step (`set_gradient_accumulation_boundary`) instead of counting a fixed
  `gradient_accumulation_steps`, which is therefore 1 (so the engine never divides the loss either);
- `engine.step()` runs once per optimizer step, after the last pass; it clips to `gradient_clipping` (set from
  alignkit's max_grad_norm) and skips an update whose gradients are not finite, and the norm alignkit logs is
  the engine's;
- accelerate only enables DeepSpeed when the Accelerator is not in CPU mode, so on a CPU the Accelerator is built
  with cpu=False and an explicit gloo backend (`build_deepspeed_accelerator`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs

from alignkit.errors import RunError, UserError

CHECKPOINT_TAG = "state"  # the engine's sub-folder inside a checkpoint's deepspeed/ folder


def wants_deepspeed() -> bool:
    """accelerate launch with a DeepSpeed config (or torchrun with its variables) sets this."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def is_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def zero_stage(accelerator: Accelerator) -> int:
    return accelerator.state.deepspeed_plugin.deepspeed_config["zero_optimization"]["stage"]


def deepspeed_plugin(dtype: str):
    """The launcher's DeepSpeed settings, checked against what alignkit drives and tests: ZeRO stage 2 or 3, no
    offload, fp32 weights without autocast, no accumulation count of its own."""
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise UserError("the launch asks for DeepSpeed, which is not installed: pip install "
                        "'alignkit[deepspeed]'") from None
    from accelerate.utils import DeepSpeedPlugin

    # zero.Init would partition the weights while transformers loads them, before LoRA, counts and checks that
    # need whole weights; the model is partitioned at `prepare` instead (each process loads it whole first).
    plugin = DeepSpeedPlugin(zero3_init_flag=False)
    config = plugin.deepspeed_config
    zero = config.get("zero_optimization", {})
    problems = []
    if zero.get("stage") not in (2, 3):
        problems.append(f"ZeRO stage {zero.get('stage')} (2 and 3 are supported)")
    for kind in ("offload_optimizer", "offload_param"):
        if zero.get(kind, {}).get("device", "none") not in ("none", None):
            problems.append(f"{kind} to {zero[kind]['device']} (no offload is supported)")
    if config.get("gradient_accumulation_steps", 1) not in (1, "auto"):
        problems.append(f"gradient_accumulation_steps {config['gradient_accumulation_steps']} (set grad_accum in "
                        "alignkit's config instead)")
    for precision in ("fp16", "bf16"):
        if str(config.get(precision, {}).get("enabled", False)).lower() == "true":
            problems.append(f"{precision} (alignkit's `dtype` decides the precision)")
    if dtype == "bf16":
        problems.append("dtype bf16 (DeepSpeed's bf16 mode keeps fp32 master weights: another recipe; use fp32)")
    if problems:
        raise UserError(f"alignkit's DeepSpeed runs are fp32 ZeRO-2/3 without offload; this run asks for "
                        f"{'; '.join(problems)}")
    config["gradient_accumulation_steps"] = 1
    # the final save needs the whole model; under ZeRO-3 it only exists gathered
    zero["stage3_gather_16bit_weights_on_model_save"] = True
    return plugin


def build_deepspeed_accelerator(dtype: str, strategy: str) -> Accelerator:
    """An Accelerator running DeepSpeed, on GPUs or, over gloo, on CPUs.

    accelerate's PartialState enables DeepSpeed only when not in CPU mode (`state.py`: `if not cpu and
    self.backend != "xla"`) and, on a machine without an accelerator, finds no backend unless one is named:
    hence cpu=False and `backend="gloo"` where CUDA is absent (DeepSpeed's CPU accelerator talks over gloo).

    accelerate would turn bf16 autocast into DeepSpeed's bf16 mode (bf16 weights, fp32 master copies), not
    alignkit's fp32 weights under autocast, so `dtype: auto` trains in fp32 here, as the start-up log says."""
    if strategy != "auto":
        raise UserError(f"the launch asks for DeepSpeed and the config for strategy: {strategy}; drop one of them")
    plugin = deepspeed_plugin(dtype)
    handlers = [] if torch.cuda.is_available() else [InitProcessGroupKwargs(backend="gloo")]
    accelerator = Accelerator(mixed_precision="no", cpu=False, deepspeed_plugin=plugin, kwargs_handlers=handlers)
    if not is_deepspeed(accelerator):  # e.g. ACCELERATE_USE_CPU forced CPU mode: accelerate would run DDP
        raise UserError("the launch asks for DeepSpeed but accelerate did not enable it (CPU mode forced by "
                        "ACCELERATE_USE_CPU or --cpu?); launch without it")
    return accelerator


def prepare(model, optimizer, accelerator: Accelerator, micro_batch: int, max_grad_norm: float):
    """The engine and its optimizer, with DeepSpeed's clipping at alignkit's max_grad_norm (0: none)."""
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    config["gradient_clipping"] = max(0.0, max_grad_norm)
    # only used by DeepSpeed's throughput bookkeeping; alignkit's batches do not come from a DataLoader
    config["train_micro_batch_size_per_gpu"] = micro_batch
    config["train_batch_size"] = micro_batch * accelerator.num_processes
    return accelerator.prepare(model, optimizer)


def backward(engine, loss: torch.Tensor, last: bool) -> None:
    """One backward pass; `last` ends the optimizer step, where ZeRO finishes reducing the gradients."""
    engine.set_gradient_accumulation_boundary(last)
    engine.backward(loss)


def step(engine, approve) -> tuple[float, bool]:
    """engine.step(): clip, then update unless the gradients are not finite. Returns (grad norm, applied).

    `approve(grad_norm)` is alignkit's guard (it also sees the loss). DeepSpeed decides on the gradients alone,
    so a non-finite loss with finite gradients would be applied: stopped rather than logged as skipped."""
    engine.step()
    norm = engine.get_global_grad_norm()
    norm = float("inf") if norm is None else float(norm)
    applied = engine.was_step_applied()
    if approve(norm) != applied:
        raise RunError("DeepSpeed applied an update whose loss was not finite (its overflow check looks at the "
                       "gradients only); the last checkpoint is kept. Lower lr or check the data")
    return norm, applied


def gathered_state_dict(engine, accelerator: Accelerator) -> dict | None:
    """The whole model's weights under ZeRO-3 (gathered, on the main process; a collective); None under ZeRO-2,
    whose parameters are whole on every process after each step."""
    if zero_stage(accelerator) != 3:
        return None
    weights = accelerator.get_state_dict(engine) or {}  # the other processes get nothing back
    return {name: tensor.detach().clone() for name, tensor in weights.items()}


def save_engine_state(engine, folder: Path) -> None:
    """Every process writes its optimizer partition (and the engine's bookkeeping) under folder/state/.

    Frozen weights are left out: the checkpoint's model/ folder holds the weights."""
    engine.save_checkpoint(str(folder), tag=CHECKPOINT_TAG, save_latest=False, exclude_frozen_parameters=True)


def load_engine_state(engine, folder: Path) -> None:
    """The optimizer partitions (and trained weights) saved by `save_engine_state`, each process its own.

    Not strict: the frozen weights were not saved and come from the checkpoint's model/ folder (LoRA's base)."""
    path, _ = engine.load_checkpoint(str(folder), tag=CHECKPOINT_TAG, load_module_strict=False,
                                     load_optimizer_states=True, load_lr_scheduler_states=False)
    if path is None:
        raise RunError(f"{folder}: DeepSpeed could not load the optimizer state saved there")


def frozen_reference(model: torch.nn.Module, accelerator: Accelerator) -> torch.nn.Module:
    """The DPO reference copy: under ZeRO-3 partitioned like the policy (an engine without optimizer; each
    forward gathers one module at a time, so each process holds 1/N of it); under ZeRO-2 whole on every process.
    """
    if zero_stage(accelerator) != 3:
        return accelerator.prepare_model(model, evaluation_mode=True)
    import deepspeed

    # batch sizes: DeepSpeed's bookkeeping only (this engine never steps)
    config = {"train_micro_batch_size_per_gpu": 1, "train_batch_size": accelerator.num_processes,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
              "steps_per_print": float("inf")}
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine


def leave_deepspeed_process(code: int) -> None:
    """End a process of a DeepSpeed launch without the interpreter's teardown (nothing is left to write).

    ZeRO-3's all-gathers leave gloo work objects holding Python tensors, and a gloo worker thread may release
    them while the main thread is already finalizing the interpreter: the worker cannot take the GIL, exits
    inside a C++ destructor and the process aborts ("terminate called without an active exception", SIGABRT,
    seen in about 1 run in 10 on CPU; core dump: ProcessGroupGloo::runLoop → ~AsyncBarrierWork →
    ~AsyncAllgatherWork → THPVariable_dealloc → take_gil → pthread_exit)."""
    import torch.distributed as dist

    if not (wants_deepspeed() and dist.is_available() and dist.is_initialized()):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
