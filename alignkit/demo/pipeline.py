"""The demo pipeline: SFT → preference data → DPO → evaluation → report, each stage in its own folder.

1. SFT teaches the review format (two sentences, then `Rating: N/5` agreeing with the sentiment), measured by
   `format_score` on held-out prompts before and after.
2. The SFT model samples n completions per training prompt; VADER's compound score ranks them; best vs worst
   becomes a preference pair (DPO paper §6.1, with VADER in place of the IMDb classifier).
3. DPO (LoRA, β = 0.1, the SFT model as reference) on those pairs; `--beta-sweep` trains one model per β.
4. Held-out evaluation of the SFT and DPO models: mean reward, DPO's win rate over SFT, and the sequence-level
   KL(π‖π_SFT) estimated on the DPO model's own samples.
5. `report.md` with plots.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

from alignkit.api import make_dpo_config, make_sft_config
from alignkit.config import DemoConfig
from alignkit.demo import data
from alignkit.demo.report import write_report
from alignkit.errors import UserError
from alignkit.eval.kl import completion_logps, sequence_kl
from alignkit.generation import generate
from alignkit.log import log
from alignkit.make_prefs import make_preferences, write_jsonl
from alignkit.models.load import load_model, load_tokenizer, resolve_model
from alignkit.recipes import dpo as dpo_recipe
from alignkit.recipes import sft as sft_recipe
from alignkit.rewards import sentiment_reward
from alignkit.training.backend import mixed_precision


@dataclass
class Plan:
    """Sizes of one demo run; `quick` is a smoke test, `full` the measured experiment."""

    train_prompts: int
    eval_prompts: int
    sft_epochs: float
    sft_lr: float
    n: int
    max_new_tokens: int
    dpo_epochs: float
    dpo_lr: float
    eval_samples: int


FULL = Plan(train_prompts=64, eval_prompts=32, sft_epochs=1, sft_lr=1e-4, n=4, max_new_tokens=48, dpo_epochs=3,
            dpo_lr=5e-4, eval_samples=2)
QUICK = Plan(train_prompts=16, eval_prompts=8, sft_epochs=2, sft_lr=1e-4, n=4, max_new_tokens=32, dpo_epochs=2,
             dpo_lr=5e-4, eval_samples=2)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _stderr(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    mean = _mean(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))


def score(samples, prompts, reward) -> list[list[float]]:
    return [reward([p] * len(group), [s.text for s in group]) for p, group in zip(prompts, samples, strict=True)]


def win_rate(ours: list[list[float]], theirs: list[list[float]]) -> float:
    """Fraction of held-out (prompt, sample index) comparisons won, ties counting one half."""
    outcomes = [1.0 if a > b else 0.5 if a == b else 0.0
                for group_a, group_b in zip(ours, theirs, strict=True) for a, b in zip(group_a, group_b, strict=True)]
    return _mean(outcomes)


def format_rate(samples, reward) -> float:
    flat = [s for group in samples for s in group]
    sentiments = reward([""] * len(flat), [data.review_text(s.text) for s in flat])
    return _mean([data.format_score(s.text, v) for s, v in zip(flat, sentiments, strict=True)])


def preference_settings(plan: Plan, seed: int) -> dict:
    """How the preference stage trains, from the SFT model: LoRA r 16, α 32, a constant lr, batch 8."""
    return {"lora": True, "lora_r": 16, "lora_alpha": 32, "lr": plan.dpo_lr, "epochs": plan.dpo_epochs,
            "batch_size": 8, "max_length": 256, "save_steps": 0, "seed": seed, "overwrite": True,
            "lr_scheduler": "constant", "warmup_ratio": 0.0}


def held_out(policy, tokenizer, prompts: list, plan: Plan, seed: int, reward, sft_rewards: list[list[float]],
             autocast: bool, name: str, reference_logps) -> dict:
    """A trained model's figures on the held-out prompts: its samples (plan.eval_samples per prompt, seed + 1, as
    the SFT model's were drawn), their mean reward, the win rate over the SFT samples and KL(π‖π_SFT), with
    `reference_logps(samples)` the SFT model's log-probs of the policy's own samples."""
    samples = generate(policy, tokenizer, prompts, n=plan.eval_samples, max_new_tokens=plan.max_new_tokens,
                       seed=seed + 1, autocast=autocast, desc=f"sampling {name}")
    rewards = score(samples, prompts, reward)
    flat = [s for group in samples for s in group]
    flat_rewards = [r for group in rewards for r in group]
    return {"mean_reward": _mean(flat_rewards), "reward_stderr": _stderr(flat_rewards),
            "win_rate_vs_sft": win_rate(rewards, sft_rewards),
            "kl_to_sft": sequence_kl(completion_logps(policy, flat, tokenizer.pad_token_id), reference_logps(flat)),
            "format_rate": format_rate(samples, reward), "rewards": flat_rewards,
            "samples": [{"prompt": prompts[s.prompt_index], "completion": s.text} for s in flat[:6]]}


def adapter_off_logps(policy, samples, pad_id: int) -> list[float]:
    with policy.disable_adapter():
        return completion_logps(policy, samples, pad_id)


def run(cfg: DemoConfig) -> dict:
    started = time.time()
    plan = QUICK if cfg.quick else FULL
    out = Path(cfg.output_dir or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    if (out / "report.md").exists() and not cfg.overwrite:
        raise UserError(f"{out}: already holds a demo; pass --overwrite to replace it")
    (out / "data").mkdir(parents=True, exist_ok=True)
    betas = cfg.beta_sweep or [0.1]
    if any(b <= 0 for b in betas):
        raise UserError("beta_sweep: every beta must be > 0")
    reward = sentiment_reward()
    autocast = mixed_precision("auto") == "bf16"
    timings: dict[str, float] = {}

    train_prompts, eval_prompts = data.prompts(cfg.seed)
    train_prompts, eval_prompts = train_prompts[:plan.train_prompts], eval_prompts[:plan.eval_prompts]
    write_jsonl([{"prompt": p} for p in train_prompts], out / "data" / "train_prompts.jsonl")
    write_jsonl([{"prompt": p} for p in eval_prompts], out / "data" / "eval_prompts.jsonl")
    write_jsonl(data.sft_rows(train_prompts, cfg.seed), out / "data" / "sft.jsonl")

    def sample(model, tokenizer, name: str, n: int):
        return generate(model, tokenizer, eval_prompts, n=n, max_new_tokens=plan.max_new_tokens, seed=cfg.seed + 1,
                        autocast=autocast, desc=f"sampling {name}")

    # 0. The base model, for the before-SFT skill figure.
    tick = time.time()
    base_path = resolve_model(cfg.model)
    base_tokenizer = load_tokenizer(base_path)
    base_samples = sample(load_model(base_path), base_tokenizer, "base", 1)
    timings["base_eval_s"] = time.time() - tick

    # 1. SFT
    tick = time.time()
    log("stage 1/4: SFT on the review format")
    sft_summary, sft_model, tokenizer = sft_recipe.train(make_sft_config(
        model=cfg.model, data=[str(out / "data" / "sft.jsonl")], output_dir=str(out / "sft"), epochs=plan.sft_epochs,
        lr=plan.sft_lr, batch_size=8, max_length=256, save_steps=0, seed=cfg.seed, overwrite=True))
    timings["sft_s"] = time.time() - tick

    # 2. Preference data from the SFT model's own samples
    tick = time.time()
    log("stage 2/4: sampling and scoring preference pairs")
    pairs, prefs_stats = make_preferences(sft_model, tokenizer, train_prompts, reward, n=plan.n,
                                          max_new_tokens=plan.max_new_tokens, seed=cfg.seed, autocast=autocast)
    write_jsonl(pairs, out / "data" / "prefs.jsonl")
    if not pairs:
        raise UserError("no preference pairs: every prompt's samples got the same reward")
    sft_samples = sample(sft_model, tokenizer, "SFT", plan.eval_samples)
    sft_rewards = score(sft_samples, eval_prompts, reward)
    timings["prefs_and_sft_eval_s"] = time.time() - tick
    del sft_model

    # 3 + 4. DPO per beta, each evaluated against the SFT model
    results = []
    for beta in betas:
        tick = time.time()
        name = "dpo" if len(betas) == 1 else f"dpo-beta{beta:g}"
        log(f"stage 3/4: DPO with beta {beta:g}")
        dpo_summary, policy, _ = dpo_recipe.train(make_dpo_config(
            model=str(out / "sft" / "final"), data=[str(out / "data" / "prefs.jsonl")], output_dir=str(out / name),
            beta=beta, **preference_settings(plan, cfg.seed)))
        log("stage 4/4: evaluation on held-out prompts")
        # The adapter switched off is the SFT model, DPO's reference.
        figures = held_out(policy, tokenizer, eval_prompts, plan, cfg.seed, reward, sft_rewards, autocast,
                           f"DPO beta {beta:g}", partial(adapter_off_logps, policy, pad_id=tokenizer.pad_token_id))
        results.append({"beta": beta, "run": name, **figures, "train_accuracy": dpo_summary.get("rewards/accuracies"),
                        "train_margin": dpo_summary.get("rewards/margins")})
        timings[f"{name}_s"] = time.time() - tick
        del policy

    sft_flat = [r for group in sft_rewards for r in group]
    summary = {
        "model": cfg.model, "quick": cfg.quick, "plan": asdict(plan),
        "skill": {"format_rate_base": format_rate(base_samples, reward),
                  "format_rate_sft": format_rate(sft_samples, reward)},
        "prefs": asdict(prefs_stats),
        "sft": {"mean_reward": _mean(sft_flat), "reward_stderr": _stderr(sft_flat), "kl_to_sft": 0.0,
                "rewards": sft_flat, "final_loss": sft_summary["final_loss"],
                "samples": [{"prompt": eval_prompts[s.prompt_index], "completion": s.text}
                            for group in sft_samples for s in group][:6]},
        "base_samples": [{"prompt": eval_prompts[g[0].prompt_index], "completion": g[0].text}
                         for g in base_samples[:3]],
        "dpo": results,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "wall_seconds": round(time.time() - started, 1),
    }
    (out / "eval.json").write_text(json.dumps(summary, indent=1))
    report = write_report(out, summary)
    summary["wall_seconds"] = round(time.time() - started, 1)
    (out / "eval.json").write_text(json.dumps(summary, indent=1))
    best = results[0]
    log(f"SFT reward {summary['sft']['mean_reward']:.3f} → DPO {best['mean_reward']:.3f} "
        f"(win rate {best['win_rate_vs_sft']:.2f}, KL {best['kl_to_sft']:.2f}); "
        f"{summary['wall_seconds']:.0f} s in all")
    print(f"report: {report}")
    return summary
