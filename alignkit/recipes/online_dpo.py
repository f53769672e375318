"""Online (iterative) DPO, `alignkit dpo --online`: rounds of sampling from the policy being trained, scoring,
pairing and DPO on those pairs.

Round r of R, in RUN/round-r/:
  1. n completions per prompt sampled from the current policy: the weights in memory (under bf16 autocast a
     copy of them, LoRA merged, linear layers in bf16: `sampling_copy`; else the live model, adapter and all),
     the prompts batched with a KV cache (`make_prefs.sample_completions`), seed + r;
  2. scored by the reward (`rewards.load_reward`: a function, a classifier folder or a judge model) and paired
     best against worst above the margin (`make_prefs.pair_samples`): samples.jsonl, pairs.jsonl;
  3. DPO on those pairs (`recipes.dpo.DPO` on `training.loop.fit`, a fresh optimizer and lr schedule), so
     round-r is also an ordinary DPO run folder (metrics.jsonl of its steps, summary.json, final/).
The reference of every round is the starting model (`online_reference: start`) or a frozen copy of the policy as
the round begins (`previous`). RUN/metrics.jsonl holds a row per round with its time split (generation, scoring,
training, loading and saving), RUN/summary.json every round, RUN/final/ the last round's model.

Resume restarts at a round boundary: finished rounds are kept, the policy is reloaded from the last finished
round's final/, and the first unfinished round starts over, reusing its pairs when they were written.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

import torch
from accelerate.utils import set_seed

from alignkit.config import DPOConfig, save_yaml
from alignkit.errors import UserError
from alignkit.log import log
from alignkit.make_prefs import pair_samples, read_prompts, sample_completions, score_samples, write_jsonl
from alignkit.models.load import build_policy, load_inputs, load_model
from alignkit.recipes.dpo import DPO, reference_kind
from alignkit.rewards import load_reward
from alignkit.training.backend import mixed_precision, store_linear_weights_in_bf16
from alignkit.training.loop import fit
from alignkit.training.reference import FrozenModel
from alignkit.training.run_folder import (
    check_output_dir,
    claim_output_dir,
    release_run_folder,
    releases_run_folder_on_error,
)

ROUND_FILE = "round.json"  # written once a round has trained: the round is finished


class RoundDPO(DPO):
    """DPO on one round's pairs, with the reference the online run keeps: `kept` (the starting model, loaded
    once), or a frozen copy of the policy as it enters the round (`copy_policy`); it trains `policy`, the model in
    memory as the last round left it (None: the loop loads cfg.model)."""

    def __init__(self, cfg: DPOConfig, kept=None, copy_policy: bool = False, policy=None):
        super().__init__(cfg)
        self.kept, self.copy_policy, self.policy = kept, copy_policy, policy

    def build_model(self, cfg: DPOConfig, model_path: Path, checkpoint):
        return build_policy(cfg, model_path, checkpoint) if self.policy is None else self.policy

    def setup(self, model, model_path, backend, data) -> None:
        if self.copy_policy:
            self.kept = FrozenModel(backend.frozen(frozen_copy(model)), self.pad_id, backend.device)
        if self.kept is None:
            return super().setup(model, model_path, backend, data)
        self.device = backend.device
        self.references = {"train": self.kept, "eval": self.kept}


def frozen_copy(model):
    """The policy's weights as they are, detached from training; a LoRA adapter merged into the copy."""
    duplicate = copy.deepcopy(model)
    return duplicate.merge_and_unload() if hasattr(duplicate, "merge_and_unload") else duplicate


def sampling_copy(policy):
    """The policy's current weights to sample from under bf16 autocast: a LoRA adapter merged and the linear
    layers stored in bf16, the dtype autocast computes them in, so no decoding step casts a weight or runs an
    adapter branch."""
    duplicate = frozen_copy(policy)
    duplicate.requires_grad_(False)
    store_linear_weights_in_bf16(duplicate)
    return duplicate.eval()


@releases_run_folder_on_error
def run(cfg: DPOConfig) -> dict:
    """Every round, then RUN/final/ and RUN/summary.json; returns the summary."""
    reward = load_reward(cfg.reward)  # a bad spec stops the run before a model is loaded
    prompts = read_prompts(cfg.prompts)
    if not prompts:
        raise UserError(f"{cfg.prompts}: no prompts")
    out = check_output_dir(cfg, "dpo-online")
    model_path, tokenizer, _ = load_inputs(cfg)
    rows = claim(cfg, out)
    policy = starting_policy(cfg, model_path, out / f"round-{len(rows)}" / "final" if rows else None)
    kept = None
    for r in range(len(rows) + 1, cfg.rounds + 1):
        row, policy, objective = run_round(cfg, r, out, policy, tokenizer, prompts, reward, kept,
                                           sum(done["steps"] for done in rows))
        if cfg.online_reference == "start" and reference_kind(cfg) == "copy":
            kept = objective.references["train"]
        rows.append(row)
        write_jsonl(rows, out / "metrics.jsonl")
    return finish(cfg, out, rows)


def claim(cfg: DPOConfig, out: Path) -> list[dict]:
    """Create or reuse the run folder; the rows of the rounds a resume keeps."""
    claim_output_dir(cfg, out, True)
    if cfg.overwrite and not cfg.resume:
        for folder in out.glob("round-*"):
            shutil.rmtree(folder)
    save_yaml(cfg, out / "config.yaml")
    if not cfg.resume:
        return []
    rows = finished_rounds(out, cfg.rounds)
    log(f"resuming after round {len(rows)} of {cfg.rounds}" if rows else "no finished round: starting at round 1")
    return rows


def run_round(cfg: DPOConfig, r: int, out: Path, policy, tokenizer, prompts: list, reward, kept, steps_before: int):
    """Sample, score, pair and train round r; (its metrics row, the trained policy, its DPO objective). The row's
    `step` counts the optimizer steps of every round so far, so `alignkit report` plots rounds as steps."""
    folder = out / f"round-{r}"
    sampling = sample_round(cfg, r, folder, policy, tokenizer, prompts, reward)
    round_cfg = replace(cfg, online=False, data=[str(folder / "pairs.jsonl")], output_dir=str(folder),
                        resume=False, overwrite=True)
    objective = RoundDPO(round_cfg, kept, copy_policy=cfg.online_reference == "previous" and r > 1
                         and reference_kind(cfg) != "none", policy=policy)
    summary, policy, _ = fit(round_cfg, objective)
    row = round_row(r, steps_before, sampling, summary)
    (folder / ROUND_FILE).write_text(json.dumps(row, indent=1))
    log(f"round {r}/{cfg.rounds}: {row['pairs']} pairs from {row['prompts']} prompts x {cfg.n} samples (mean reward "
        f"{row['mean_reward']:.3f}); generation {row['generation_s']:.1f}s, scoring {row['scoring_s']:.1f}s, "
        f"training {row['training_s']:.1f}s, loading and saving {row['loading_saving_s']:.1f}s; generation + "
        f"training = {row['generation_plus_training_vs_training']:.2f}x training alone")
    return row, policy, objective


def round_row(r: int, steps_before: int, sampling: dict, summary: dict) -> dict:
    """Round r's metrics row: its pairs, its time split and its DPO run's last metrics."""
    training, wall = summary["train_seconds"], summary["wall_seconds"]
    return {"round": r, "step": steps_before + summary["steps"], **sampling, "training_s": training,
            "loading_saving_s": round(wall - training, 2),
            "round_s": round(sampling["generation_s"] + sampling["scoring_s"] + wall, 2),
            "generation_plus_training_vs_training": round((sampling["generation_s"] + training)
                                                          / max(training, 1e-9), 3),
            **{k: summary.get(k) for k in ("steps", "final_loss", "rewards/accuracies", "rewards/margins",
                                           "trained_pairs", "reference")}}


def sample_round(cfg: DPOConfig, r: int, folder: Path, policy, tokenizer, prompts: list, reward) -> dict:
    """samples.jsonl and pairs.jsonl of round r and their figures (kept in sampling.json: a round that starts
    over after an interruption reuses them)."""
    saved = folder / "sampling.json"
    if saved.is_file() and (folder / "pairs.jsonl").is_file():
        log(f"round {r}: reusing the pairs sampled before in {folder}")
        return json.loads(saved.read_text())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    autocast = cfg.dtype == "auto" and mixed_precision("auto") == "bf16"
    began = time.time()
    sampler = sampling_copy(policy.to(device)) if autocast and cfg.sample_from_copy else policy.to(device)
    samples = sample_completions(sampler, tokenizer, prompts, cfg.n, cfg.max_new_tokens, cfg.temperature, cfg.top_p,
                                 cfg.generation_batch_size, cfg.seed + r, autocast)
    del sampler
    generated = time.time()
    rewards = score_samples(prompts, samples, reward)
    scored = time.time()
    pairs, stats = pair_samples(prompts, samples, rewards, cfg.pairs, cfg.margin)
    if not pairs:
        raise UserError(f"round {r}: no pair of samples differs in reward by more than margin {cfg.margin}; "
                        "raise n or temperature, or lower margin")
    write_jsonl([{"prompt": p, "completion": s.text, "reward": v}
                 for p, group, values in zip(prompts, samples, rewards, strict=True)
                 for s, v in zip(group, values, strict=True)], folder / "samples.jsonl")
    write_jsonl(pairs, folder / "pairs.jsonl")
    figures = {"prompts": stats.prompts, "samples": stats.samples, "pairs": stats.pairs,
               "skipped_prompts": stats.skipped_prompts, "mean_reward": stats.mean_reward,
               "generation_s": round(generated - began, 2), "scoring_s": round(scored - generated, 2)}
    saved.write_text(json.dumps(figures, indent=1))
    return figures


def starting_policy(cfg: DPOConfig, model_path: Path, final: Path | None):
    """The starting model (with a new LoRA adapter under lora), or the policy a finished round saved."""
    set_seed(cfg.seed)
    if final is None or not cfg.lora:
        return build_policy(cfg, model_path, None) if final is None else load_model(
            final, torch.bfloat16 if cfg.dtype == "bf16" else torch.float32, cfg.trust_remote_code)
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    policy = build_policy(cfg, model_path, None)
    set_peft_model_state_dict(policy, load_file(final / "adapter_model.safetensors"))
    return policy


def finished_rounds(out: Path, rounds: int) -> list[dict]:
    """The rows of the rounds finished in a row from round 1 (whose final/ is still there)."""
    rows = []
    for r in range(1, rounds + 1):
        marker = out / f"round-{r}" / ROUND_FILE
        if not (marker.is_file() and (marker.parent / "final").is_dir()):
            break
        rows.append(json.loads(marker.read_text()))
    return rows


def finish(cfg: DPOConfig, out: Path, rows: list[dict]) -> dict:
    """RUN/final/ (hard links to the last round's files) and RUN/summary.json."""
    final = out / "final"
    if final.exists():
        shutil.rmtree(final)
    shutil.copytree(out / f"round-{cfg.rounds}" / "final", final, copy_function=link_or_copy)
    totals = {name: round(sum(row[name] for row in rows), 2)
              for name in ("generation_s", "scoring_s", "training_s", "loading_saving_s", "round_s")}
    summary = {"online": True, "rounds": len(rows), "online_reference": cfg.online_reference, "reward": cfg.reward,
               "final_loss": rows[-1]["final_loss"], "steps": sum(row["steps"] for row in rows),
               "trained_pairs": sum(row["trained_pairs"] for row in rows),
               "mean_reward_by_round": [row["mean_reward"] for row in rows], **totals,
               "generation_plus_training_vs_training": round(
                   (totals["generation_s"] + totals["training_s"]) / max(totals["training_s"], 1e-9), 3),
               "per_round": rows, "output_dir": str(out), "final": str(final)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    log(f"done: {len(rows)} rounds, mean reward by round "
        f"{', '.join(f'{v:.3f}' for v in summary['mean_reward_by_round'])}; model in {final}")
    release_run_folder(out)
    return summary


def link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
