"""Reward modelling as an objective on the training loop (`training.loop.fit`).

The model is transformers' AutoModelForSequenceClassification with one output, built from the causal LM's
weights and a new score head (full or LoRA; under LoRA the score head is trained whole). A sequence's reward r is
the score of its last token that is not padding, as transformers computes it (`config.pad_token_id`).
Loss of a step: the mean over the step's pairs of −log σ(r_c − r_r − m) + λ·(r_c + r_r)² (`losses.reward`), m
the row's `margin` (0 where absent), λ = center_rewards_coefficient. Metrics: loss; accuracy = fraction of pairs
with r_c > r_r; rewards/chosen, rewards/rejected = mean rewards; margin = mean r_c − r_r; pairs, tokens (read by
the model); eval/ the same over the held-out pairs. final/ is an ordinary sequence-classification folder (a LoRA
run's adapter merged into it), which `alignkit prefs --reward` and `alignkit eval --reward` take.
"""

from __future__ import annotations

import functools
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from alignkit.config import RMConfig
from alignkit.data.mixture import source_paths
from alignkit.data.prefs import PreferenceRow
from alignkit.data.sources import iter_rows
from alignkit.data.store import lengths
from alignkit.errors import UserError
from alignkit.losses import bradley_terry_loss
from alignkit.models.load import base_of, build_policy, load_reward_model, no_hub_lookup
from alignkit.recipes.dpo import load_pair_data
from alignkit.training.forward import pair_rewards
from alignkit.training.launch import relaunch, wants_relaunch
from alignkit.training.loop import Data, StepResult, fit
from alignkit.training.run_folder import releases_run_folder_on_error

METRICS = ("loss", "accuracy", "rewards/chosen", "rewards/rejected", "margin")


@dataclass
class RewardPass:
    pairs: list[PreferenceRow]
    margins: torch.Tensor | None  # [P], None when no row has a margin


class RM:
    name = "rm"
    counts = ("pairs", "tokens")

    def __init__(self, cfg: RMConfig):
        self.cfg = cfg
        self.layout = "prefix_shared" if cfg.layout == "auto" else cfg.layout
        self.pad_id = 0
        self.device = torch.device("cpu")
        self.margins: dict[str, float] = {}  # a row's origin -> its margin

    def build_model(self, cfg, model_path: Path, checkpoint: Path | None):
        return build_policy(cfg, model_path, checkpoint, functools.partial(load_reward_model, pad_id=self.pad_id),
                            "SEQ_CLS")

    def load_data(self, tokenizer, template: str) -> Data:
        self.pad_id = tokenizer.pad_token_id
        data = load_pair_data(self.cfg, tokenizer, template)
        self.margins = read_margins(source_paths(self.cfg.data) + self.cfg.eval_data)
        return data

    def longest_forward(self, rows: Sequence, device: torch.device) -> int:
        sizes = lengths(rows)
        if self.layout == "padded":
            return 2 * self.cfg.batch_size * int(sizes.max())
        return int(sizes.sum(axis=1).max())

    def reserved_bytes(self, model) -> float:
        return 0.0

    def setup(self, model, model_path, backend, data: Data) -> None:
        self.device = backend.device

    def frozen_models(self) -> list:
        return []

    def describe(self, device: torch.device) -> str:
        margins = f"margins on {len(self.margins)} rows" if self.margins else "no margins"
        return f"reward model, layout {self.layout}, {margins}, centring λ {self.cfg.center_rewards_coefficient}"

    def totals(self, batches: list[Sequence]) -> torch.Tensor:
        return torch.tensor([float(sum(len(b) for b in batches))])

    def units(self, batches: list[Sequence], split: str) -> list[RewardPass]:
        """Padded: a micro-batch per pass. Otherwise one pair per pass (see `DPO.units`)."""
        if self.layout == "padded":
            groups = [list(pairs) for pairs in batches]
        else:
            groups = [[pair] for pairs in batches for pair in pairs]
        return [RewardPass(pairs, self.margins_of(pairs)) for pairs in groups]

    def margins_of(self, pairs: list[PreferenceRow]) -> torch.Tensor | None:
        if not self.margins:
            return None
        return torch.tensor([self.margins.get(p.origin, 0.0) for p in pairs], device=self.device)

    def loss(self, model, unit: RewardPass, totals: torch.Tensor) -> tuple[torch.Tensor, dict]:
        step_pairs = totals[0].item()
        chosen, rejected, tokens = pair_rewards(model, unit.pairs, self.layout, self.pad_id, self.device)
        per_pair = bradley_terry_loss(chosen, rejected, unit.margins, self.cfg.center_rewards_coefficient)
        loss = per_pair.sum() / step_pairs
        sums = {name: value.sum() / step_pairs for name, value in reward_metrics(chosen, rejected).items()}
        return loss, {"loss": loss, **sums, "tokens": tokens}

    def step_result(self, sums: dict, totals: torch.Tensor) -> StepResult:
        pairs = int(totals[0].item())
        return StepResult({name: sums[name].item() for name in METRICS}, pairs,
                          {"pairs": pairs, "tokens": int(sums["tokens"].item())})

    def eval_metrics(self, sums: dict) -> dict:
        return {f"eval/{name}": sums[name].item() for name in METRICS}

    def postfix(self, row: dict) -> dict:
        shown = {k: float("nan") if row.get(k) is None else row[k] for k in METRICS}
        return {"loss": f"{shown['loss']:.4f}", "acc": f"{shown['accuracy']:.2f}",
                "margin": f"{shown['margin']:.3f}", "lr": f"{row['lr']:.1e}"}

    def summary(self, state, last: StepResult) -> dict:
        seconds, (pairs, tokens) = max(state.step_seconds, 1e-9), (state.counts["pairs"], state.counts["tokens"])
        return {**{k: last.means[k] for k in METRICS[1:] if k in last.means},
                "trained_pairs": pairs, "tokens": tokens, "pairs_per_s": round(pairs / seconds, 3),
                "tokens_per_s": round(tokens / seconds, 1)}


def reward_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-pair metric values (summed over pairs by the caller, then divided by the pair count)."""
    chosen, rejected = chosen.detach(), rejected.detach()
    return {"accuracy": (chosen > rejected).float(), "rewards/chosen": chosen, "rewards/rejected": rejected,
            "margin": chosen - rejected}


def read_margins(paths: list[str]) -> dict[str, float]:
    """Each row's `margin` by the row's origin (FILE:LINE), for the rows that have one."""
    margins = {}
    for row in iter_rows(paths):
        value = row.fields.get("margin")
        if value is None or value == "":
            continue
        try:
            number = float(value) if not isinstance(value, bool) else math.nan
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number):
            raise UserError(f"{row.origin}: 'margin' must be a number, got {value!r}")
        margins[row.origin] = number
    return margins


def merge_final(final: Path, cfg: RMConfig, pad_id: int):
    """final/ of a LoRA run, rewritten as the merged sequence-classification model (tokenizer kept), so that it
    loads with AutoModelForSequenceClassification.from_pretrained alone."""
    import json

    from peft import PeftModel

    base_name = json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"]
    dtype = torch.bfloat16 if cfg.dtype == "bf16" else torch.float32
    base = load_reward_model(base_of(base_name), dtype, cfg.trust_remote_code, pad_id)
    merged = PeftModel.from_pretrained(base, final).merge_and_unload()
    staging = final.parent / ".final.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    with no_hub_lookup():
        merged.save_pretrained(staging)
    for item in final.iterdir():
        if item.is_file() and not item.name.startswith("adapter_") and item.name != "README.md" \
                and not (staging / item.name).exists():
            shutil.copy2(item, staging / item.name)
    shutil.rmtree(final)
    os.replace(staging, final)
    return merged


def run(cfg: RMConfig) -> dict:
    """Train and save; returns the summary written to OUTPUT_DIR/summary.json."""
    if wants_relaunch(cfg):
        return relaunch(cfg, "rm")
    return train(cfg)[0]


@releases_run_folder_on_error
def train(cfg: RMConfig):
    """Train and save; returns (summary, trained model, tokenizer)."""
    objective = RM(cfg)
    merges = cfg.lora and int(os.environ.get("RANK", "0")) == 0
    summary, model, tokenizer = fit(cfg, objective, keep_model=not merges)
    if merges:
        # The merged model is rebuilt from final/: the trained one goes first, so only one is ever in memory.
        del model
        model = merge_final(Path(summary["final"]), cfg, objective.pad_id)
    return summary, model, tokenizer
