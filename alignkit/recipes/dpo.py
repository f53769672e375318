"""DPO and its loss family as an objective on the training loop (`training.loop.fit`).

Each pair's chosen and rejected sequences go through the policy in one forward pass (stacked in the batch).
Loss of a step: Σ_k w_k · mean over the step's pairs of loss_k (see `alignkit.losses.dpo`); the `sft` term is
the mean token NLL over the step's chosen tokens. The reference log-probs come from `training.reference`.
Metrics (TRL's names): rewards/chosen = mean β(ℓθ − ℓref) of the chosen completions (ℓref = 0 without a
reference), rewards/rejected likewise, rewards/margins = their mean difference, rewards/accuracies = fraction of
pairs whose chosen reward beats the rejected one, logps/chosen and logps/rejected = mean ℓθ, pairs = pairs in
the step, tokens = non-padding tokens the policy read in the step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from alignkit.config import REFERENCE_FREE, DPOConfig
from alignkit.data.cache import load_pair_rows
from alignkit.data.mixture import load_mixture, log_mixture
from alignkit.data.prefs import PreferenceRow
from alignkit.data.store import lengths, trained_counts
from alignkit.data.tokenize import PLAIN, Rendering
from alignkit.errors import UserError
from alignkit.log import log
from alignkit.losses import mean_nll, pair_losses
from alignkit.training import loop, reference
from alignkit.training.data_order import split_eval
from alignkit.training.forward import pair_logps
from alignkit.training.loop import Data, StepResult

METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected")


@dataclass
class PairPass:
    """Pairs for one forward pass and the reference that scores them (the precomputed one of their set)."""

    pairs: list[PreferenceRow]
    reference: object


class DPO:
    name = "dpo"
    counts = ("pairs", "tokens")

    def __init__(self, cfg: DPOConfig):
        self.cfg = cfg
        # auto: each pair's prompt read once, its two answers after it (see data/packing.py)
        self.layout = "prefix_shared" if cfg.layout == "auto" else cfg.layout
        self.pad_id = 0
        self.device = torch.device("cpu")
        self.references: dict = {}  # train / eval -> its reference
        self._totals: tuple = (None, ())  # the step's totals tensor and its values, read once per step

    def load_data(self, tokenizer, template: str) -> Data:
        self.pad_id = tokenizer.pad_token_id
        return load_pair_data(self.cfg, tokenizer, template)

    def longest_forward(self, rows: Sequence, device: torch.device) -> int:
        """A prefix-shared sequence holds the prompt once, so chosen + rejected bounds it."""
        sizes = lengths(rows)
        if self.layout == "padded":
            return 2 * self.cfg.batch_size * int(sizes.max())
        if self.layout == "prefix_shared":
            return int(sizes.sum(axis=1).max())
        return int(sizes.max())

    def reserved_bytes(self, model) -> float:
        """A frozen copy as reference is still to be loaded: its fp32 weights count against the same memory."""
        return 4.0 * sum(p.numel() for p in model.parameters()) if reference_kind(self.cfg) == "copy" else 0.0

    def setup(self, model, model_path, backend, data: Data) -> None:
        self.device = backend.device
        self.references = reference.for_splits(self.cfg, reference_kind(self.cfg), model, model_path, backend,
                                               self.pad_id, {"train": data.train, "eval": data.eval}, self.layout)

    def frozen_models(self) -> list:
        model = self.references["train"].model
        return [] if model is None else [model]

    def describe(self, device: torch.device) -> str:
        return (f"losses {'+'.join(self.cfg.loss_type)}, beta {self.cfg.beta}, reference "
                f"{self.references['train'].kind}, layout {self.layout}")

    def totals(self, batches: list[Sequence]) -> torch.Tensor:
        return torch.tensor([float(sum(len(b) for b in batches)), float(sum(chosen_tokens(b) for b in batches))])

    def units(self, batches: list[Sequence], split: str) -> list[PairPass]:
        """Padded: a micro-batch per pass. Otherwise one pair per pass: in training each is followed by its
        backward, so one pair's activations are alive at a time, and under FSDP and ZeRO-3 every process runs
        as many of them as each other one once `Backend.equal_passes` has evened out their counts."""
        ref = self.references[split]
        if self.layout == "padded":
            return [PairPass(list(pairs), ref) for pairs in batches]
        return [PairPass([pair], ref) for pairs in batches for pair in pairs]

    def loss(self, model, unit: PairPass, totals: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """These pairs' share of the step loss, their metric sums over the step's pairs, the tokens read."""
        cfg = self.cfg
        if self._totals[0] is not totals:
            self._totals = (totals, totals.tolist())
        step_pairs, step_chosen_tokens = self._totals[1]
        policy_c, policy_r, len_c, len_r, tokens = pair_logps(model, unit.pairs, self.layout, self.pad_id,
                                                              self.device)
        ref_c, ref_r = unit.reference.logps(model, unit.pairs, self.layout)
        per_pair = pair_losses(cfg.loss_type, cfg.beta, cfg.label_smoothing, cfg.simpo_gamma, policy_c, policy_r,
                               ref_c, ref_r, len_c, len_r)
        loss = torch.zeros((), device=self.device)
        for kind, weight in zip(cfg.loss_type, cfg.loss_weights or [1.0] * len(cfg.loss_type), strict=True):
            if kind == "sft":  # the chosen tokens' NLL, normalised over the whole step's chosen tokens
                loss = loss + weight * mean_nll(policy_c, step_chosen_tokens)
            else:
                loss = loss + weight * per_pair[kind].sum() / step_pairs
        sums = {k: v.sum() / step_pairs for k, v in pair_metrics(cfg.beta, policy_c, policy_r, ref_c, ref_r).items()}
        return loss, {"loss": loss, **sums, "tokens": tokens}

    def step_result(self, sums: dict, totals: torch.Tensor) -> StepResult:
        means = {name: sums[name].item() for name in METRICS}
        pairs = int(totals[0].item())
        return StepResult(means, pairs, {"pairs": pairs, "tokens": int(sums["tokens"].item())})

    def eval_metrics(self, sums: dict) -> dict:
        return {f"eval/{name}": sums[name].item() for name in METRICS}

    def postfix(self, row: dict) -> dict:
        shown = {k: float("nan") if row.get(k) is None else row[k] for k in METRICS}
        return {"loss": f"{shown['loss']:.4f}", "acc": f"{shown['rewards/accuracies']:.2f}",
                "margin": f"{shown['rewards/margins']:.3f}", "lr": f"{row['lr']:.1e}"}

    def summary(self, state, last: StepResult) -> dict:
        seconds, (pairs, tokens) = max(state.step_seconds, 1e-9), (state.counts["pairs"], state.counts["tokens"])
        return {**{k: last.means[k] for k in METRICS[1:] if k in last.means},
                "trained_pairs": pairs, "tokens": tokens, "pairs_per_s": round(pairs / seconds, 3),
                "tokens_per_s": round(tokens / seconds, 1), "reference": self.references["train"].kind}


def load_pair_data(cfg, tokenizer, template: str) -> Data:
    """Training pairs drawn from the data sources, eval pairs (eval_data, or a held-out fraction), statistics."""
    train, stats, sources = load_training_pairs(cfg, tokenizer, template)
    eval_pairs: Sequence = []
    if cfg.eval_data:
        eval_pairs, _ = load_pairs(cfg.eval_data, tokenizer, template, cfg.max_length, cfg.on_bad_row,
                                   cfg.num_proc, Rendering.of(cfg))
    else:
        train, eval_pairs = split_eval(train, cfg.eval_fraction, cfg.seed)
    if not train:
        raise UserError("no preference pairs left to train on")
    return Data(train, eval_pairs, {k: v for k, v in stats.items() if k != "pairs"}, sources)


def reference_kind(cfg: DPOConfig) -> str:
    return reference.kind_for(cfg, set(cfg.loss_type) <= REFERENCE_FREE)


def pair_metrics(beta: float, policy_c, policy_r, ref_c, ref_r) -> dict[str, torch.Tensor]:
    """Per-pair metric values (summed over pairs by the caller, then divided by the pair count)."""
    chosen_rewards = beta * (policy_c - ref_c).detach()
    rejected_rewards = beta * (policy_r - ref_r).detach()
    return {"rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
            "rewards/margins": chosen_rewards - rejected_rewards,
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
            "logps/chosen": policy_c.detach(), "logps/rejected": policy_r.detach()}


def chosen_tokens(pairs: Sequence) -> int:
    return int(trained_counts(pairs)[:, 0].sum()) if len(pairs) else 0


def load_pairs(paths: list[str], tokenizer, template: str, max_length: int, on_bad_row: str = "error",
               num_proc: int | None = None, rendering: Rendering = PLAIN) -> tuple[Sequence, dict]:
    pairs, stats, cached = load_pair_rows(paths, tokenizer, template, max_length, on_bad_row, num_proc, rendering)
    if cached:
        log(f"{', '.join(paths)}: tokenised pairs loaded from cache")
    if stats.skipped:
        log(f"skipped {stats.skipped} bad rows (on_bad_row: skip), e.g. {stats.skipped_rows[0]}")
    if stats.identical:
        log(f"dropped {stats.identical} rows whose chosen equals rejected")
    if stats.dropped:
        log(f"dropped {stats.dropped} pairs whose prompt alone fills max_length={max_length} "
            f"(e.g. {', '.join(stats.dropped_origins[:3])})")
    return pairs, {"pairs": stats.pairs, "identical": stats.identical, "truncated": stats.truncated,
                   "dropped": stats.dropped, "skipped": stats.skipped, "skipped_examples": stats.skipped_rows}


def load_training_pairs(cfg: DPOConfig, tokenizer, template: str) -> tuple[Sequence, dict, list[dict]]:
    """Pairs drawn from the data sources (see `alignkit.data.mixture`), merged statistics, a row per source."""
    pairs, source_stats, sources = load_mixture(
        cfg.data, cfg.mix_total, cfg.seed,
        lambda path: load_pairs([path], tokenizer, template, cfg.max_length, cfg.on_bad_row, cfg.num_proc,
                                Rendering.of(cfg)),
        lambda rows: int(trained_counts(rows).sum()))
    stats = {name: sum((part[name] for part in source_stats), [] if isinstance(value, list) else 0)
             for name, value in source_stats[0].items()}
    log_mixture(sources, "pairs")
    return pairs, stats, sources


def run(cfg: DPOConfig) -> dict:
    """Train and save; returns the summary written to OUTPUT_DIR/summary.json."""
    if cfg.online:  # rounds of sampling, scoring and DPO (recipes/online_dpo.py)
        from alignkit.recipes import online_dpo

        return online_dpo.run(cfg)
    return loop.run(cfg, DPO(cfg))


def train(cfg: DPOConfig):
    """Train and save; returns (summary, trained model, tokenizer) for callers that keep working with them."""
    return loop.fit(cfg, DPO(cfg))
