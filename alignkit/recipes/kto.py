"""KTO as an objective on the training loop (`training.loop.fit`): unpaired desirable / undesirable completions
(Ethayarajh et al. 2024, arXiv 2402.01306; rows: `data.feedback`).

Each row (x, y) is scored by the policy and the reference: r = ℓθ(y|x) − ℓref(y|x), ℓ the completion's summed
log-probs. The reference point z_ref = max(0, mean of ℓθ(y'|x) − ℓref(y'|x)) over mismatched pairs: each row's
prompt with another row's completion, the other row fixed per data set (the completions rotated by one along a
seeded order of the rows, as TRL rotates them along its batches). z_ref is estimated once per optimizer step over
all its rows, on every process, before any loss, so it is the same for each micro-batch and each process count;
no gradient flows through it, and the pairs are scored with dropout off. Loss of a step:
(1/N) Σ_rows λ_D (1 − σ(β(r − z_ref))) for desirable rows, λ_U (1 − σ(β(z_ref − r))) for undesirable ones
(`losses.kto.kto_loss`), N the step's rows.
Metrics (TRL's names): loss; kl = z_ref; rewards/chosen = mean βr over the desirable rows, rewards/rejected the
same over the undesirable rows, rewards/margins = their difference (each only when the step has such rows);
logps/chosen and logps/rejected = mean ℓθ(y|x) over desirable and undesirable rows; count/chosen and
count/rejected = desirable and undesirable rows in the step; rows = rows in the step, tokens = non-padding tokens
of the rows' sequences the policy read with gradients.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from alignkit.config import KTOConfig
from alignkit.data import packing
from alignkit.data.cache import load_feedback_rows
from alignkit.data.feedback import FeedbackRow, mismatched
from alignkit.data.mixture import load_mixture, log_mixture
from alignkit.data.prefs import PreferenceRow
from alignkit.data.store import lengths, trained_counts
from alignkit.data.tokenize import Rendering
from alignkit.errors import UserError
from alignkit.log import log
from alignkit.losses.kto import kto_loss, reference_point
from alignkit.training import loop, reference
from alignkit.training.data_order import split_eval
from alignkit.training.forward import unit_sequence_logps
from alignkit.training.loop import Data, StepResult

SIDES = ("chosen", "rejected")  # TRL's names for desirable and undesirable


@dataclass
class FeedbackPass:
    """Rows for one forward pass with gradients, their reference log-probs and the step's reference point."""

    rows: list[FeedbackRow]
    ref_logps: torch.Tensor
    z_ref: torch.Tensor


class MismatchedPairs(Sequence):
    """A data set's rows as pairs for the reference objects: (the row, its prompt with its partner's completion)."""

    def __init__(self, rows: Sequence, partner: np.ndarray, max_length: int):
        self.rows, self.partner, self.max_length = rows, partner, max_length

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> PreferenceRow:
        return self.pair(self.rows[i])

    def pair(self, row: FeedbackRow) -> PreferenceRow:
        other = self.rows[int(self.partner[row.position])]
        return PreferenceRow(row.sequence, mismatched(row.sequence, other.sequence, self.max_length), row.origin,
                             row.position)


def partners(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(a seeded order of n rows, each row's partner): the row before it in that order, cyclically."""
    order = np.random.default_rng(seed).permutation(n)
    partner = np.empty(n, dtype=np.int64)
    partner[order] = np.roll(order, 1)
    return order, partner


class KTO:
    name = "kto"
    counts = ("rows", "tokens")

    def __init__(self, cfg: KTOConfig):
        self.cfg = cfg
        self.layout = "per_sequence" if cfg.layout == "auto" else cfg.layout
        self.pad_id = 0
        self.device = torch.device("cpu")
        self.pairs: dict[str, MismatchedPairs] = {}
        self.references: dict = {}
        self.policy = None
        self.backend = None

    def load_data(self, tokenizer, template: str) -> Data:
        self.pad_id = tokenizer.pad_token_id
        data = load_data(self.cfg, tokenizer, template)
        for split, rows in (("train", data.train), ("eval", data.eval)):
            self.pairs[split] = MismatchedPairs(rows, partners(len(rows), self.cfg.seed)[1], self.cfg.max_length)
        return data

    def longest_forward(self, rows: Sequence, device: torch.device) -> int:
        """A mismatched pair is at most two rows long; a padded pass holds a micro-batch of them."""
        longest = 2 * int(lengths(rows).max())
        return self.cfg.batch_size * longest if self.layout == "padded" else longest

    def reserved_bytes(self, model) -> float:
        return 4.0 * sum(p.numel() for p in model.parameters()) if reference_kind(self.cfg) == "copy" else 0.0

    def setup(self, model, model_path, backend, data: Data) -> None:
        self.device, self.policy, self.backend = backend.device, model, backend
        self.references = reference.for_splits(self.cfg, reference_kind(self.cfg), model, model_path, backend,
                                               self.pad_id, self.pairs, self.pair_layout())

    def frozen_models(self) -> list:
        model = self.references["train"].model
        return [] if model is None else [model]

    def describe(self, device: torch.device) -> str:
        cfg = self.cfg
        return (f"beta {cfg.beta}, desirable_weight {cfg.desirable_weight}, undesirable_weight "
                f"{cfg.undesirable_weight}, reference {self.references['train'].kind}, layout {self.layout}")

    def pair_layout(self) -> str:
        """A row and its mismatched pair share the prompt: one forward per pair, unless padded."""
        return "padded" if self.layout == "padded" else "prefix_shared"

    def totals(self, batches: list[Sequence]) -> torch.Tensor:
        return torch.tensor([float(sum(len(b) for b in batches))])

    def units(self, batches: list[Sequence], split: str) -> list[FeedbackPass]:
        """The passes of these micro-batches (padded: one per micro-batch, else one per row), after scoring the
        mismatched pairs of all of them (a collective: every process calls this once per step, rows or not)."""
        groups = list(batches) if self.layout == "padded" else [[row] for rows in batches for row in rows]
        ref = self.references[split]
        kl_sum = torch.zeros((), device=self.device)
        scored = []
        # eval mode: dropout would draw random numbers here, and a resumed run calls this once more at set-up
        was_training = self.policy.training
        self.policy.eval()
        with torch.no_grad(), self.backend.autocast():
            for rows, weight in self.scoring_passes(groups, split):
                pairs = [self.pairs[split].pair(row) for row in rows]
                ref_logps, ref_kl = ref.logps(self.policy, pairs, self.pair_layout())
                policy_kl = self.sequence_logps(self.policy, [p.rejected for p in pairs])[0]
                if weight:
                    kl_sum = kl_sum + (policy_kl.float() - ref_kl.float()).sum()
                    scored.append((list(rows), ref_logps.float()))
        self.policy.train(was_training)
        count = self.backend.reduce(torch.tensor([float(sum(len(b) for b in batches))], device=self.device), "sum")
        z_ref = reference_point(self.backend.reduce(kl_sum, "sum"), count.item())
        return [FeedbackPass(rows, ref_logps, z_ref) for rows, ref_logps in scored]

    def scoring_passes(self, groups: list, split: str) -> list[tuple[list, float]]:
        """(rows, weight) per scoring group, each group a reference pass and then a policy pass. Under FSDP and
        ZeRO-3 each forward pass gathers parameters from all processes, so `Backend.equal_passes` pads with
        weight-0 one-row groups until every process runs as many, in the same order; elsewhere the processes
        score independently."""
        if self.backend.partitioned:
            return self.backend.equal_passes(groups, [self.pairs[split].rows[0]])
        return [(rows, 1.0) for rows in groups]

    def sequence_logps(self, model, sequences: list) -> tuple[torch.Tensor, int]:
        """Σ log π over each sequence's scored tokens, and the non-padding tokens read."""
        if self.layout == "padded":
            unit = packing.padded(sequences, self.pad_id).to(self.device)
            return unit_sequence_logps(model, unit, len(sequences))[0], int(unit.attention_mask.sum())
        sums = [unit_sequence_logps(model, packing.single(s).to(self.device), 1)[0] for s in sequences]
        return torch.cat(sums), sum(len(s.input_ids) for s in sequences)

    def loss(self, model, unit: FeedbackPass, totals: torch.Tensor) -> tuple[torch.Tensor, dict]:
        cfg = self.cfg
        policy_logps, tokens = self.sequence_logps(model, [row.sequence for row in unit.rows])
        desirable = torch.tensor([row.label for row in unit.rows], device=policy_logps.device)
        per_row = kto_loss(policy_logps, unit.ref_logps, desirable, unit.z_ref, cfg.beta, cfg.desirable_weight,
                           cfg.undesirable_weight)
        loss = per_row.sum() / totals[0]
        rewards = cfg.beta * (policy_logps - unit.ref_logps).detach()
        sums = {"loss": loss, "kl": unit.z_ref * len(unit.rows), "rows": float(len(unit.rows)), "tokens": tokens}
        for side, mask in zip(SIDES, (desirable, ~desirable), strict=True):
            sums |= {f"rewards/{side}": rewards[mask].sum(), f"logps/{side}": policy_logps.detach()[mask].sum(),
                     f"count/{side}": mask.sum().float()}
        return loss, sums

    def means(self, sums: dict) -> dict:
        means = {"loss": sums["loss"].item(), "kl": (sums["kl"] / sums["rows"].clamp(min=1)).item()}
        for side in SIDES:
            count = sums[f"count/{side}"].item()
            means[f"count/{side}"] = count
            if count:
                means |= {f"{k}/{side}": (sums[f"{k}/{side}"] / count).item() for k in ("rewards", "logps")}
        if "rewards/chosen" in means and "rewards/rejected" in means:
            means["rewards/margins"] = means["rewards/chosen"] - means["rewards/rejected"]
        return means

    def step_result(self, sums: dict, totals: torch.Tensor) -> StepResult:
        rows = int(totals[0].item())
        return StepResult(self.means(sums), rows, {"rows": rows, "tokens": int(sums["tokens"].item())})

    def eval_metrics(self, sums: dict) -> dict:
        return {f"eval/{k}": v for k, v in self.means(sums).items()}

    def postfix(self, row: dict) -> dict:
        shown = {k: float("nan") if row.get(k) is None else row[k] for k in ("loss", "kl", "rewards/margins")}
        return {"loss": f"{shown['loss']:.4f}", "kl": f"{shown['kl']:.3f}", "margin": f"{shown['rewards/margins']:.3f}",
                "lr": f"{row['lr']:.1e}"}

    def summary(self, state, last: StepResult) -> dict:
        seconds, (rows, tokens) = max(state.step_seconds, 1e-9), (state.counts["rows"], state.counts["tokens"])
        return {**{k: v for k, v in last.means.items() if k != "loss"}, "trained_rows": rows, "tokens": tokens,
                "rows_per_s": round(rows / seconds, 3), "tokens_per_s": round(tokens / seconds, 1),
                "reference": self.references["train"].kind}


def reference_kind(cfg: KTOConfig) -> str:
    return reference.kind_for(cfg)


def load_rows(paths: list[str], cfg: KTOConfig, tokenizer, template: str) -> tuple[Sequence, dict]:
    rows, stats, cached = load_feedback_rows(paths, tokenizer, template, cfg.max_length, cfg.on_bad_row,
                                             cfg.num_proc, Rendering.of(cfg))
    if cached:
        log(f"{', '.join(paths)}: tokenised rows loaded from cache")
    if stats.skipped:
        log(f"skipped {stats.skipped} bad rows (on_bad_row: skip), e.g. {stats.skipped_rows[0]}")
    if stats.dropped:
        log(f"dropped {stats.dropped} rows whose prompt alone fills max_length={cfg.max_length} "
            f"(e.g. {', '.join(stats.dropped_origins[:3])})")
    return rows, {"desirable": stats.desirable, "undesirable": stats.undesirable, "truncated": stats.truncated,
                  "dropped": stats.dropped, "skipped": stats.skipped, "skipped_examples": stats.skipped_rows}


def load_data(cfg: KTOConfig, tokenizer, template: str) -> Data:
    train, source_stats, sources = load_mixture(cfg.data, cfg.mix_total, cfg.seed,
                                                lambda path: load_rows([path], cfg, tokenizer, template),
                                                lambda rows: int(trained_counts(rows).sum()))
    stats = {name: sum((part[name] for part in source_stats), [] if isinstance(value, list) else 0)
             for name, value in source_stats[0].items()}
    log_mixture(sources, "rows")
    eval_rows: Sequence = []
    if cfg.eval_data:
        eval_rows = load_rows(cfg.eval_data, cfg, tokenizer, template)[0]
    else:
        train, eval_rows = split_eval(train, cfg.eval_fraction, cfg.seed)
    if not train:
        raise UserError("no KTO rows left to train on")
    return Data(train, eval_rows, stats, sources)


def run(cfg: KTOConfig) -> dict:
    """Train and save; returns the summary written to OUTPUT_DIR/summary.json."""
    return loop.run(cfg, KTO(cfg))


def train(cfg: KTOConfig):
    """Train and save; returns (summary, trained model, tokenizer) for callers that keep working with them."""
    return loop.fit(cfg, KTO(cfg))
