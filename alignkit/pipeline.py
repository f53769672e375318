"""`alignkit pipeline plan.yaml`: stages of SFT and DPO, each starting from the previous stage's final model.

A plan (see docs/data-mixtures.md):

    model: smollm2-135m-instruct      # where the first stage starts
    output_dir: runs/dmt              # one folder per stage inside: 01-NAME, 02-NAME, ...
    defaults: {lr: 1e-4, epochs: 2}   # fields every stage gets unless it sets them
    evals:                            # optional: scored after every stage (alignkit.eval.abilities)
      math: evals/math.jsonl
      code: {benchmark: humaneval, limit: 20}                            # greedy pass@1
      chat: {benchmark: mt-bench, limit: 8, judge: smollm2-135m-instruct}  # mean 1-10 grade
    eval_base: true                   # also score the starting model (folder 00-base)
    stages:
      - {name: specialists, method: sft, data: [math.jsonl, code.jsonl]}
      - {name: general, method: sft, data: [general.jsonl, {path: math.jsonl, fraction: 1/256}]}

Every stage's config is checked, every data file found and every evaluation file read before the first stage
trains. `--resume` skips finished stages (their saved config must equal the plan's) and resumes the unfinished
one from its newest checkpoint; the stages after a stage that trained again train again. `pipeline.json` and
`abilities.md` sum up the stages.
"""

from __future__ import annotations

import dataclasses
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
from alignkit.log import log

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
    if "model" in plan and not (isinstance(plan["model"], str) and plan["model"]):
        raise UserError(f"{where}: 'model' must be a model folder, .gguf file or alias, got {plan['model']!r}")
    tokens = plan.get("eval_max_new_tokens", 256)
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens <= 0:
        raise UserError(f"{where}: 'eval_max_new_tokens' must be a whole number > 0, got {tokens!r}")
    if not isinstance(plan.get("eval_base", False), bool):
        raise UserError(f"{where}: 'eval_base' must be true or false, got {plan['eval_base']!r}")
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


def start_model(stages: list[Stage], i: int) -> str:
    """The model stage i starts from: its own `model`, else the previous stage's final/."""
    return stages[i].values["model"] or str(stages[i - 1].folder / "final")


def check_stages(stages: list[Stage], where: str) -> None:
    """Build every stage's config (a later stage's model stands in until its predecessor exists) and check
    that its files exist, so a typo in the last stage stops the pipeline before the first one trains."""
    for i, stage in enumerate(stages):
        values = {**stage.values, "model": start_model(stages, i)}
        config = build_config(METHODS[stage.method], values, f"{where}: stages[{i}] ({stage.name})")
        for path in source_paths(config.data) + config.eval_data:
            require(Path(path))


# ---------------------------------------------------------------- running it

def run(cfg) -> dict:
    from alignkit.eval.abilities import eval_set, load_set

    plan, out, stages = read_plan(cfg)
    check_stages(stages, str(cfg.plan))
    evals = {str(k): eval_set(v, f"{cfg.plan}: evals.{k}") for k, v in (plan.get("evals") or {}).items()}
    for spec in evals.values():
        load_set(spec)  # a bad evaluation row stops the pipeline now, not after hours of training
    _claim(out, cfg, Path(cfg.plan).read_text(encoding="utf-8"))

    report: dict[str, Any] = {"plan": str(cfg.plan), "output_dir": str(out), "stages": []}
    base_model = str(plan.get("model", "smollm2-135m-instruct"))
    if evals and plan.get("eval_base"):
        report["base"] = {"model": base_model,
                          "abilities": score_stage(base_model, out / "00-base", evals, plan)}
    retrained = False
    for i, stage in enumerate(stages):
        values = {**stage.values, "model": start_model(stages, i)}
        log(f"stage {i + 1}/{len(stages)}: {stage.name} ({stage.method}) from {values['model']}")
        # once a stage trains, the stages that start from it have a new start model: none may be skipped
        follows = stage.values["model"] is None
        summary, trained = run_stage(stage, values, f"{cfg.plan}: stages[{i}] ({stage.name})", retrained and follows)
        retrained = trained or (retrained and follows)
        final = stage.folder / "final"
        entry = {"name": stage.name, "method": stage.method, "model": values["model"],
                 "output_dir": str(stage.folder), "final": str(final),
                 **{k: summary.get(k) for k in ("final_loss", "steps", "trained_tokens", "sources")}}
        if evals:
            entry["abilities"] = score_stage(str(final), stage.folder, evals, plan)
        report["stages"].append(entry)
        _write_json(out / "pipeline.json", report)
    if evals:
        table = abilities_table(report, list(evals)) + judge_notes(evals)
        (out / "abilities.md").write_text(table, encoding="utf-8")
        print(table)
    log(f"pipeline done: {len(stages)} stages in {out}")
    return report


PIPELINE_FILES = ("plan.yaml", "pipeline.json", "abilities.md")
STAGE_FOLDER = re.compile(r"\d\d-.+")


def _claim(out: Path, cfg, plan_text: str) -> None:
    """Create or reuse the pipeline folder; --overwrite deletes only what a pipeline writes there."""
    if cfg.resume and cfg.overwrite:
        raise UserError("--resume continues a pipeline and --overwrite replaces it: give one of them")
    holds = out.is_dir() and any(out.iterdir())
    if holds and not (out / "plan.yaml").is_file():
        raise UserError(f"{out}: holds files but no pipeline (no plan.yaml): choose another output_dir")
    if holds and not (cfg.resume or cfg.overwrite):
        raise UserError(f"{out}: already holds a pipeline; pass --resume to continue it or --overwrite to replace it")
    if holds and cfg.overwrite:
        for child in out.iterdir():
            if child.is_dir() and STAGE_FOLDER.fullmatch(child.name):
                shutil.rmtree(child)
            elif child.name in PIPELINE_FILES:
                child.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan.yaml").write_text(plan_text, encoding="utf-8")  # read before: the plan may be this very file


def run_stage(stage: Stage, values: dict, where: str, after_retrained: bool) -> tuple[dict, bool]:
    """(summary, whether it trained): skipped when it finished before with the same config and the stages
    before it were not trained again; resumed when it started; trained afresh otherwise."""
    from alignkit.recipes import dpo, sft

    config = build_config(METHODS[stage.method], values, where)
    done = stage.folder / "summary.json"
    if (stage.folder / "config.yaml").is_file() and not after_retrained:
        _same_config(stage.folder, config)
        if done.is_file():
            log(f"{stage.folder}: finished before, skipped")
            return json.loads(done.read_text()), False
        config.resume = True
    elif stage.folder.is_dir() and any(stage.folder.iterdir()):
        if after_retrained:
            log(f"{stage.folder}: trained again, as the stage before it was")
        config.overwrite = True
    return (sft if stage.method == "sft" else dpo).run(config), True


def _same_config(folder: Path, config) -> None:
    saved = yaml.safe_load((folder / "config.yaml").read_text())
    defaults = to_dict(type(config)())
    now = {k: v for k, v in to_dict(config).items() if k not in ("resume", "overwrite")}
    # a field added by a newer alignkit, at its default, changes nothing about the run that was saved
    changed = [k for k, v in now.items() if saved.get(k, defaults[k]) != v]
    if changed:
        key = changed[0]
        raise UserError(f"{folder}: was run with {key}: {saved.get(key)!r}, the plan now says {now[key]!r}; "
                        "run with --overwrite to start the pipeline again")


def set_fingerprint(spec) -> Any:
    """What a set's scores depend on: its file; a benchmark's settings, data copy and judge model files."""
    from alignkit.data.sources import file_fingerprint
    from alignkit.models.load import resolve_model

    if isinstance(spec, str):
        return file_fingerprint([spec])
    return {**dataclasses.asdict(spec), "data_files": file_fingerprint([spec.data]) if spec.data else "fetched",
            "judge_files": file_fingerprint([str(resolve_model(spec.judge))]) if spec.judge else None}


def score_stage(model: str, folder: Path, evals: dict, plan: dict) -> dict[str, float | None]:
    """Ability scores of a stage's model, kept in FOLDER/abilities.json; reused only while the model's files,
    the evaluation sets (a benchmark's settings and judge), the reply length and the precision (bf16 autocast
    where the machine has it) are what they were."""
    from alignkit.data.sources import file_fingerprint
    from alignkit.eval.abilities import evaluate_sets
    from alignkit.models.load import load_model, load_tokenizer, resolve_model
    from alignkit.training.backend import mixed_precision

    path = resolve_model(model)
    max_new_tokens = int(plan.get("eval_max_new_tokens", 256))
    inputs = {"model": model, "model_files": file_fingerprint([str(path)]), "max_new_tokens": max_new_tokens,
              "precision": mixed_precision("auto"),
              "sets": {name: set_fingerprint(spec) for name, spec in evals.items()}}
    saved = folder / "abilities.json"
    if saved.is_file():
        stored = json.loads(saved.read_text())
        if stored.get("inputs") == inputs:
            return {name: result["score"] for name, result in stored["results"].items()}
    folder.mkdir(parents=True, exist_ok=True)
    scored = evaluate_sets(load_model(path).eval(), load_tokenizer(path), evals, max_new_tokens,
                           samples_file=folder / "abilities-samples.jsonl")
    _write_json(saved, {"inputs": inputs, "results": scored})
    return {name: result["score"] for name, result in scored.items()}


def abilities_table(report: dict, names: list[str]) -> str:
    rows = ([("base", report["base"]["abilities"])] if "base" in report else []) + [
        (s["name"], s["abilities"]) for s in report["stages"]]
    lines = ["| stage | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    # a judge that gave no usable grade leaves an mt-bench score empty rather than zero
    lines += [f"| {name} | " + " | ".join("-" if scores[n] is None else f"{scores[n]:.3f}" for n in names) + " |"
              for name, scores in rows]
    return "\n".join(lines) + "\n"


def judge_notes(evals: dict) -> str:
    """Under the table, for each mt-bench column: what its numbers are and why they are not leaderboard ones."""
    from alignkit.eval.mtbench import caveat

    notes = [f"\n{name}: MT-Bench mean grade 1-10 ({spec.limit or 'all'} questions); "
             f"{caveat(spec.judge)}.\n" for name, spec in evals.items()
             if not isinstance(spec, str) and spec.benchmark == "mt-bench"]
    return "".join(notes)


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=1), encoding="utf-8")
    tmp.replace(path)
