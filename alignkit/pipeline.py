"""`alignkit pipeline plan.yaml`: stages of SFT and DPO, each starting from the previous stage's final model.

A plan (see docs/data-mixtures.md):

    model: smollm2-135m-instruct      # where the first stage starts
    output_dir: runs/dmt              # one folder per stage inside: 01-NAME, 02-NAME, ...
    defaults: {lr: 1e-4, epochs: 2}   # fields every stage gets unless it sets them
    evals: {math: evals/math.jsonl}   # optional: scored after every stage (alignkit.eval.abilities)
    eval_base: true                   # also score the starting model (folder 00-base)
    stages:
      - {name: specialists, method: sft, data: [math.jsonl, code.jsonl]}
      - {name: general, method: sft, data: [general.jsonl, {path: math.jsonl, fraction: 1/256}]}

Every stage's config is checked, and every data and evaluation file read, before the first stage trains.
`--resume` skips finished stages (their saved config must equal the plan's) and resumes the unfinished one
from its newest checkpoint. `pipeline.json` and `abilities.md` sum up the stages.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from alignkit.config import DPOConfig, SFTConfig, build_config, load_yaml, suggest, to_dict
from alignkit.data.mixture import source_paths
from alignkit.data.sources import require
from alignkit.errors import UserError
from alignkit.models.embedded import log

METHODS = {"sft": SFTConfig, "dpo": DPOConfig}
PLAN_KEYS = ("model", "output_dir", "defaults", "evals", "eval_base", "eval_max_new_tokens", "stages")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass
class Stage:
    name: str
    method: str
    folder: Path
    values: dict[str, Any]  # the stage's config fields, model and output_dir included
    config: Any = None  # built once the previous stage's output is known


# ---------------------------------------------------------------- reading the plan

def read_plan(cfg) -> tuple[dict, Path, list[Stage]]:
    plan = load_yaml(cfg.plan)
    where = str(cfg.plan)
    unknown = [k for k in plan if k not in PLAN_KEYS]
    if unknown:
        raise UserError(f"{where}: unknown key '{unknown[0]}'{suggest(str(unknown[0]), PLAN_KEYS)}")
    if not isinstance(plan.get("stages"), list) or not plan["stages"]:
        raise UserError(f"{where}: 'stages' must be a list of stages, each with a name and a method (sft or dpo)")
    for key in ("defaults", "evals"):
        if not isinstance(plan.get(key) or {}, dict):
            raise UserError(f"{where}: '{key}' must be a mapping")
    if "model" in (plan.get("defaults") or {}) or "output_dir" in (plan.get("defaults") or {}):
        raise UserError(f"{where}: 'defaults' cannot set model or output_dir (set the plan's own)")
    out = Path(cfg.output_dir or plan.get("output_dir") or f"runs/pipeline-{Path(cfg.plan).stem}")
    stages = [_stage(i, raw, plan, out, where) for i, raw in enumerate(plan["stages"])]
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise UserError(f"{where}: stage names must differ, got {', '.join(names)}")
    return plan, out, stages


def _stage(i: int, raw: Any, plan: dict, out: Path, where: str) -> Stage:
    at = f"{where}: stages[{i}]"
    if not isinstance(raw, dict):
        raise UserError(f"{at}: a stage is a mapping with name, method and its fields")
    values = dict(raw)
    name, method = str(values.pop("name", "")), values.pop("method", None)
    if not NAME.fullmatch(name):
        raise UserError(f"{at}: 'name' is required: letters, digits, '.', '_' or '-' (it names the stage folder)")
    if method not in METHODS:
        raise UserError(f"{at} ({name}): 'method' must be sft or dpo, got {method!r}")
    if "output_dir" in values:
        raise UserError(f"{at} ({name}): a stage's output_dir is OUTPUT_DIR/{i + 1:02d}-{name}; set the plan's")
    folder = out / f"{i + 1:02d}-{name}"
    merged = {**(plan.get("defaults") or {}), **values, "output_dir": str(folder)}
    merged.setdefault("model", plan.get("model", "smollm2-135m-instruct") if i == 0 else None)
    return Stage(name, method, folder, merged)


def check_stages(stages: list[Stage], where: str) -> None:
    """Build every stage's config (a later stage's model stands in until its predecessor exists) and check
    that its files exist, so a typo in the last stage stops the pipeline before the first one trains."""
    for i, stage in enumerate(stages):
        values = {**stage.values, "model": stage.values["model"] or str(stages[i - 1].folder / "final")}
        config = build_config(METHODS[stage.method], values, f"{where}: stages[{i}] ({stage.name})")
        for path in source_paths(config.data) + config.eval_data:
            require(Path(path))


# ---------------------------------------------------------------- running it

def run(cfg) -> dict:
    from alignkit.eval.abilities import load_tasks

    plan, out, stages = read_plan(cfg)
    check_stages(stages, str(cfg.plan))
    evals = {str(k): str(v) for k, v in (plan.get("evals") or {}).items()}
    for path in evals.values():
        load_tasks(path)  # a bad evaluation row stops the pipeline now, not after hours of training
    _claim(out, cfg)
    shutil.copyfile(cfg.plan, out / "plan.yaml")

    report: dict[str, Any] = {"plan": str(cfg.plan), "output_dir": str(out), "stages": []}
    start_model = str(plan.get("model", "smollm2-135m-instruct"))
    if evals and plan.get("eval_base"):
        report["base"] = {"model": start_model,
                          "abilities": score_stage(start_model, out / "00-base", evals, plan)}
    previous = None
    for i, stage in enumerate(stages):
        values = {**stage.values, "model": stage.values["model"] or str(previous)}
        log(f"stage {i + 1}/{len(stages)}: {stage.name} ({stage.method}) from {values['model']}")
        summary = run_stage(stage, values, cfg, f"{cfg.plan}: stages[{i}] ({stage.name})")
        previous = stage.folder / "final"
        entry = {"name": stage.name, "method": stage.method, "model": values["model"],
                 "output_dir": str(stage.folder), "final": str(previous),
                 **{k: summary.get(k) for k in ("final_loss", "steps", "trained_tokens", "sources")}}
        if evals:
            entry["abilities"] = score_stage(str(previous), stage.folder, evals, plan)
        report["stages"].append(entry)
        _write_json(out / "pipeline.json", report)
    if evals:
        table = abilities_table(report, list(evals))
        (out / "abilities.md").write_text(table, encoding="utf-8")
        print(table)
    log(f"pipeline done: {len(stages)} stages in {out}")
    return report


def _claim(out: Path, cfg) -> None:
    if out.exists() and any(out.iterdir()) and not (cfg.resume or cfg.overwrite):
        raise UserError(f"{out}: already holds a pipeline; pass --resume to continue it or --overwrite to replace it")
    if cfg.overwrite and not cfg.resume and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def run_stage(stage: Stage, values: dict, cfg, where: str) -> dict:
    """Train one stage, skip it when it finished before with the same config, or resume it."""
    from alignkit.recipes import dpo, sft

    config = build_config(METHODS[stage.method], values, where)
    done = stage.folder / "summary.json"
    if done.is_file():
        _same_config(stage.folder, config)
        log(f"{stage.folder}: finished before, skipped")
        return json.loads(done.read_text())
    started = stage.folder.exists() and any(stage.folder.iterdir())
    config.resume = started
    return (sft if stage.method == "sft" else dpo).run(config)


def _same_config(folder: Path, config) -> None:
    saved = yaml.safe_load((folder / "config.yaml").read_text())
    now = {k: v for k, v in to_dict(config).items() if k not in ("resume", "overwrite")}
    changed = [k for k, v in now.items() if saved.get(k) != v]
    if changed:
        key = changed[0]
        raise UserError(f"{folder}: finished with {key}: {saved.get(key)!r}, the plan now says {now[key]!r}; "
                        "run with --overwrite to start the pipeline again")


def score_stage(model: str, folder: Path, evals: dict[str, str], plan: dict) -> dict[str, float]:
    """Ability scores of a stage's model, kept in FOLDER/abilities.json (reused on --resume)."""
    from alignkit.eval.abilities import evaluate_sets
    from alignkit.models.load import load_model, load_tokenizer, resolve_model

    saved = folder / "abilities.json"
    if saved.is_file() and set(json.loads(saved.read_text())) == set(evals):
        return {k: v["score"] for k, v in json.loads(saved.read_text()).items()}
    folder.mkdir(parents=True, exist_ok=True)
    path = resolve_model(model)
    scored = evaluate_sets(load_model(path).eval(), load_tokenizer(path), evals,
                           int(plan.get("eval_max_new_tokens", 256)), samples_file=folder / "abilities-samples.jsonl")
    _write_json(saved, scored)
    return {name: result["score"] for name, result in scored.items()}


def abilities_table(report: dict, names: list[str]) -> str:
    rows = ([("base", report["base"]["abilities"])] if "base" in report else []) + [
        (s["name"], s["abilities"]) for s in report["stages"]]
    lines = ["| stage | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(f"{scores[n]:.3f}" for n in names) + " |" for name, scores in rows]
    return "\n".join(lines) + "\n"


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=1), encoding="utf-8")
    tmp.replace(path)
