"""The shipped accelerate config files load with accelerate's own loader and name only keys it knows."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import launch_command_parser

CONFIGS = Path(__file__).parent.parent / "configs" / "accelerate"
EXPECTED = {"ddp.yaml": ("MULTI_GPU", None), "fsdp.yaml": ("FSDP", None), "fsdp_multinode.yaml": ("FSDP", None),
            "deepspeed_zero2.yaml": ("DEEPSPEED", 2), "deepspeed_zero3.yaml": ("DEEPSPEED", 3)}


def test_every_shipped_config_is_checked():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_loads_and_names_valid_launch_keys(name):
    config = load_config_from_file(str(CONFIGS / name))  # raises on an unknown top-level key
    kind, zero_stage = EXPECTED[name]
    assert config.distributed_type.value == kind
    # accelerate launch turns each fsdp_config / deepspeed_config entry into the launch option of that name
    options = {action.dest for action in launch_command_parser()._actions}
    nested = {**(config.fsdp_config or {}), **(config.deepspeed_config or {})}
    assert set(nested) <= options, set(nested) - options
    if kind == "FSDP":
        assert config.fsdp_config["fsdp_version"] == 2  # what alignkit's plugin builds (training/strategy.py)
    if zero_stage is not None:
        assert config.deepspeed_config["zero_stage"] == zero_stage


def test_a_deepspeed_launch_without_deepspeed_installed_stops_with_one_line(monkeypatch):
    """accelerate launch with a DeepSpeed config sets ACCELERATE_USE_DEEPSPEED; without the package, one line."""
    from alignkit.errors import UserError
    from alignkit.training.strategy import build_accelerator

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import deepspeed raises ImportError
    with pytest.raises(UserError, match=r"not installed: pip install 'alignkit\[deepspeed\]'"):
        build_accelerator("no", "auto", "fp32")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_deepspeed_launch_with_another_strategy_in_the_config_stops_with_one_line(monkeypatch, strategy):
    from alignkit.errors import UserError
    from alignkit.training.strategy import build_accelerator

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match=f"DeepSpeed and the config for strategy: {strategy}; drop one"):
        build_accelerator("no", strategy, "fp32")


def test_an_fsdp_launch_asking_for_other_settings_is_refused(monkeypatch):
    """The FSDP settings alignkit is written for are fixed; a config asking for FSDP1 must not be half-honoured."""
    from alignkit.errors import UserError
    from alignkit.training.strategy import fsdp_plugin

    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(UserError, match="FSDP_VERSION=1"):
        fsdp_plugin()
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert fsdp_plugin().fsdp_version == 2
