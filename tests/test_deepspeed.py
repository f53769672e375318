"""DeepSpeed ZeRO-2 / ZeRO-3 through accelerate: 2 CPU processes (gloo) follow the 1-process trajectory.

Skipped without deepspeed (`pip install 'alignkit[deepspeed]'`). The launches run the shipped accelerate config
(`accelerate launch --config_file configs/accelerate/deepspeed_zero*.yaml`) or torchrun with the variables that
config sets (ACCELERATE_USE_DEEPSPEED, ACCELERATE_DEEPSPEED_ZERO_STAGE).
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import write_jsonl
from tests.test_distributed import DPO_ROWS, SFT_ROWS, metrics
from tests.test_kto_orpo_distributed import KTO_ROWS

pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                reason="deepspeed is not installed (pip install 'alignkit[deepspeed]')")
# the runs: DeepSpeed's CPU accelerator compiles its shared-memory communication op on first use (52 s here)
compiles = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None,
                              reason="no C++ compiler: DeepSpeed's CPU accelerator compiles an op on first use")

CONFIGS = Path(__file__).parent.parent / "configs" / "accelerate"
# (command, rows, flags): full SFT; DPO with LoRA (reference: the base under the adapter); full DPO (reference: a
# frozen copy, partitioned like the policy under ZeRO-3); full KTO (its reference point's scoring passes, outside
# the loop's, padded to equal counts over the processes)
MODES = {"sft": ("sft", SFT_ROWS, ["--lr", "1e-3"]),
         "dpo-lora": ("dpo", DPO_ROWS, ["--lr", "1e-2", "--lora", "--lora-dropout", "0"]),
         "dpo-full": ("dpo", DPO_ROWS, ["--lr", "1e-3"]),
         "kto-full": ("kto", KTO_ROWS, ["--lr", "1e-2"])}
METRICS = {"sft": [], "dpo": ["rewards/margins", "rewards/accuracies", "pairs"],
           "kto": ["kl", "rewards/chosen", "rewards/rejected", "rows"]}


def launch(args: list[str], stage: int | None, via_config: bool = False, script: str | None = None) -> str:
    """alignkit in 2 processes under ZeRO `stage` (torchrun with accelerate's variables, or accelerate launch with
    the shipped config), or in 1 plain process when stage is None; returns stderr."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    target = [script] if script else ["-m", "alignkit"]
    if stage is None:
        command = [sys.executable, *target]
    elif via_config:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   str(CONFIGS / f"deepspeed_zero{stage}.yaml"), "--num_processes", "2", *target]
    else:
        env.update(ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_ZERO_STAGE=str(stage))
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *target]
    done = subprocess.run([*command, *args], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


@compiles
@pytest.mark.parametrize("mode", list(MODES))
def test_zero2_and_zero3_match_one_process_with_the_same_global_batch(tmp_path, tiny_model_dir, mode):
    """Losses, metrics, evaluation and final weights of 2 processes under ZeRO-2 and ZeRO-3 equal those of one
    process with the same global batch: alignkit's loss scaling, the engine's boundary and clipping at
    max_grad_norm (1.0, active: the norms are 0.7-2.8) give the single-process gradients."""
    command, rows, extra = MODES[mode]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    held_out = write_jsonl(tmp_path / "eval.jsonl", rows[:1])  # the second process has no eval row
    common = [command, "--model", str(tiny_model_dir), "--data", str(data), "--max-steps", "5", "--dtype", "fp32",
              "--save-steps", "0", "--grad-accum", "2", "--eval-data", str(held_out), "--eval-steps", "2", *extra]
    launch([*common, "--output-dir", str(tmp_path / "one"), "--batch-size", "4"], stage=None)
    for stage in (2, 3):
        # the shipped config once per mode and stage pair, torchrun with its variables otherwise
        via_config = (mode == "sft") == (stage == 2)
        log = launch([*common, "--output-dir", str(tmp_path / f"zero{stage}"), "--batch-size", "2"], stage,
                     via_config)
        assert f"global batch 2 x 2 processes x 2 accumulation (deepspeed zero-{stage})" in log
    one = metrics(tmp_path / "one")
    assert command != "kto" or max(r.get("kl", 0.0) for r in one) > 0  # the reference point is in play
    keys = ["loss", "tokens", "grad_norm", *METRICS[command]]
    weights = "adapter_model.safetensors" if "--lora" in extra else "model.safetensors"
    reference = load_file(tmp_path / "one" / "final" / weights)
    for stage in (2, 3):
        two = metrics(tmp_path / f"zero{stage}")
        assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 2, 3, 4, 4, 5, 5]
        for a, b in zip(one, two, strict=True):
            for key in keys if "loss" in a else ["eval/loss"]:  # a KTO step may lack one side's rows
                assert (key in a) == (key in b) and a.get(key) == pytest.approx(b.get(key), abs=1e-4), (stage, key)
        # final/ is an ordinary folder with every weight (gathered from the partitions under ZeRO-3)
        saved = load_file(tmp_path / f"zero{stage}" / "final" / weights)
        assert sorted(saved) == sorted(reference)
        assert all(saved[k].shape == reference[k].shape for k in reference)
        assert max((reference[k] - saved[k]).abs().max().item() for k in reference) < 1e-4, stage


@compiles
@pytest.mark.parametrize("stage,lora", [(2, True), (3, False)])
def test_a_resumed_run_continues_the_uninterrupted_trajectory(tmp_path, tiny_model_dir, stage, lora):
    """Stopped after step 2 and resumed to step 4: the engine's optimizer partitions (in the checkpoint's
    deepspeed/ folder), the weights (model/, an ordinary folder), data position and RNG give the losses of an
    uninterrupted run. A fresh optimizer state would not: Adam's first step after resume would differ."""
    data = write_jsonl(tmp_path / "rows.jsonl", SFT_ROWS)
    common = ["sft", "--model", str(tiny_model_dir), "--data", str(data), "--dtype", "fp32", "--lr", "1e-3",
              "--batch-size", "2", "--grad-accum", "2", "--save-steps", "2", "--lr-scheduler", "constant",
              *(["--lora", "--lora-dropout", "0.3"] if lora else [])]
    launch([*common, "--output-dir", str(tmp_path / "whole"), "--max-steps", "4"], stage)
    launch([*common, "--output-dir", str(tmp_path / "parts"), "--max-steps", "2"], stage)
    checkpoint = tmp_path / "parts" / "checkpoints" / "step-2"
    weights = load_file(checkpoint / "model" / ("adapter_model.safetensors" if lora else "model.safetensors"))
    assert all(t.numel() > 0 for t in weights.values())  # whole tensors, not ZeRO-3's empty placeholders
    assert sorted(p.name for p in (checkpoint / "deepspeed" / "state").glob("*optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    launch([*common, "--output-dir", str(tmp_path / "parts"), "--max-steps", "4", "--resume"], stage)
    whole, parts = metrics(tmp_path / "whole"), metrics(tmp_path / "parts")
    assert [r["step"] for r in parts] == [1, 2, 3, 4]
    for a, b in zip(whole, parts, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)


NAN_LAUNCH = """
import sys
from alignkit import cli
from alignkit.recipes import sft
from alignkit.training import loop

# every forward pass of step 3, on every process, gives a NaN loss
plain_step, plain_loss, at = loop.train_step, sft.mean_nll, {"step": 0}
def train_step(*args):
    at["step"] = args[-1]
    return plain_step(*args)
def mean_nll(*args):
    return plain_loss(*args) * (float("nan") if at["step"] == 3 else 1.0)
loop.train_step, sft.mean_nll = train_step, mean_nll
sys.exit(cli.main())
"""


@compiles
def test_a_non_finite_step_is_skipped_by_the_engine_and_counted(tmp_path, tiny_model_dir):
    """A NaN loss makes NaN gradients; the engine's overflow check skips the update, and alignkit logs the step
    as skipped with the engine's (non-finite) norm, and the weights stay finite."""
    script = write_script(tmp_path / "nan_launch.py", NAN_LAUNCH)
    data = write_jsonl(tmp_path / "rows.jsonl", SFT_ROWS)
    out = tmp_path / "run"
    launch(["sft", "--model", str(tiny_model_dir), "--data", str(data), "--dtype", "fp32", "--batch-size", "2",
            "--grad-accum", "2", "--max-steps", "4", "--save-steps", "0", "--output-dir", str(out)], 2,
           script=str(script))
    rows = metrics(out)
    assert [r.get("skipped", False) for r in rows] == [False, False, True, False]
    assert rows[2]["grad_norm"] is None and all(math.isfinite(r["grad_norm"]) for i, r in enumerate(rows) if i != 2)
    assert all(math.isfinite(r["loss"]) for i, r in enumerate(rows) if i != 2)
    saved = load_file(out / "final" / "model.safetensors")
    assert all(t.isfinite().all() for t in saved.values())


def write_script(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("variables,dtype,message", [
    ({"ACCELERATE_DEEPSPEED_ZERO_STAGE": "1"}, "fp32", "ZeRO stage 1 (2 and 3 are supported)"),
    ({"ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu"}, "fp32", "offload_optimizer to cpu"),
    ({"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"}, "fp32", "gradient_accumulation_steps 4 (set grad_accum"),
    ({}, "bf16", "dtype bf16"),
])
def test_a_deepspeed_setting_alignkit_does_not_drive_is_refused_in_one_line(monkeypatch, variables, dtype, message):
    """What the engine would do differently from alignkit's loop (another stage, offload, its own accumulation
    count, bf16 master weights) stops the launch before anything loads."""
    from alignkit.errors import UserError
    from alignkit.training.zero import deepspeed_plugin

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(UserError, match=re.escape(message)) as caught:
        deepspeed_plugin(dtype)
    assert "\n" not in str(caught.value)


def test_the_shipped_configs_pass_the_checks(monkeypatch):
    """What accelerate launch sets from deepspeed_zero2.yaml / deepspeed_zero3.yaml is accepted as it is."""
    from accelerate.commands.config.config_args import load_config_from_file

    from alignkit.training.zero import deepspeed_plugin

    for stage in (2, 3):
        settings = load_config_from_file(str(CONFIGS / f"deepspeed_zero{stage}.yaml")).deepspeed_config
        monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", str(settings["zero_stage"]))
        monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", str(settings["gradient_accumulation_steps"]))
        monkeypatch.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", settings["offload_optimizer_device"])
        config = deepspeed_plugin("auto").deepspeed_config
        assert config["zero_optimization"]["stage"] == stage and config["gradient_accumulation_steps"] == 1
