"""The Python API: the same runs as the CLI, from a YAML path, a mapping or a config object."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alignkit.config import DPOConfig, KTOConfig, ORPOConfig, RMConfig, SFTConfig, build_config, load_yaml, to_dict


def make_config(config_cls: type, config: Any = None, **overrides: Any) -> Any:
    if isinstance(config, config_cls):
        values = to_dict(config)
        where = "config"
    elif isinstance(config, (str, Path)):
        values, where = load_yaml(config), str(config)
    else:
        values, where = dict(config or {}), "config"
    values.update(overrides)
    return build_config(config_cls, values, where)


def make_sft_config(config: str | Path | dict | SFTConfig | None = None, **overrides: Any) -> SFTConfig:
    return make_config(SFTConfig, config, **overrides)


def make_dpo_config(config: str | Path | dict | DPOConfig | None = None, **overrides: Any) -> DPOConfig:
    return make_config(DPOConfig, config, **overrides)


def sft(config: str | Path | dict | SFTConfig | None = None, **overrides: Any) -> dict:
    """Run supervised fine-tuning; returns the run's summary (also written to OUTPUT_DIR/summary.json).

    >>> alignkit.sft("configs/sft.yaml", max_steps=20)
    >>> alignkit.sft(model="smollm2-135m-instruct", data=["rows.jsonl"], output_dir="out", lora=True)
    """
    from alignkit.recipes import sft as recipe

    return recipe.run(make_sft_config(config, **overrides))


def dpo(config: str | Path | dict | DPOConfig | None = None, **overrides: Any) -> dict:
    """Run DPO (or a relative chosen by loss_type); returns the run's summary.

    >>> alignkit.dpo(model="runs/sft/final", data=["prefs.jsonl"], output_dir="runs/dpo", lora=True, lr=5e-5)
    """
    from alignkit.recipes import dpo as recipe

    return recipe.run(make_dpo_config(config, **overrides))


def make_orpo_config(config: str | Path | dict | ORPOConfig | None = None, **overrides: Any) -> ORPOConfig:
    return make_config(ORPOConfig, config, **overrides)


def make_kto_config(config: str | Path | dict | KTOConfig | None = None, **overrides: Any) -> KTOConfig:
    return make_config(KTOConfig, config, **overrides)


def orpo(config: str | Path | dict | ORPOConfig | None = None, **overrides: Any) -> dict:
    """Run ORPO on preference pairs; returns the run's summary.

    >>> alignkit.orpo(model="smollm2-135m-instruct", data=["prefs.jsonl"], output_dir="runs/orpo", beta=0.1)
    """
    from alignkit.recipes import orpo as recipe

    return recipe.run(make_orpo_config(config, **overrides))


def kto(config: str | Path | dict | KTOConfig | None = None, **overrides: Any) -> dict:
    """Run KTO on (prompt, completion, label) rows; returns the run's summary.

    >>> alignkit.kto(model="runs/sft/final", data=["feedback.jsonl"], output_dir="runs/kto", lora=True, lr=5e-5)
    """
    from alignkit.recipes import kto as recipe

    return recipe.run(make_kto_config(config, **overrides))


def make_rm_config(config: str | Path | dict | RMConfig | None = None, **overrides: Any) -> RMConfig:
    return make_config(RMConfig, config, **overrides)


def rm(config: str | Path | dict | RMConfig | None = None, **overrides: Any) -> dict:
    """Train a Bradley–Terry reward model on preference pairs; returns the run's summary. OUTPUT_DIR/final is
    a sequence-classification folder that `--reward` (prefs, eval, online DPO) takes.

    >>> alignkit.rm(model="smollm2-135m-instruct", data=["prefs.jsonl"], output_dir="runs/rm", lr=1e-5)
    """
    from alignkit.recipes import rm as recipe

    return recipe.run(make_rm_config(config, **overrides))
