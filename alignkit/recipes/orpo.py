"""ORPO as an objective on the training loop (`training.loop.fit`): SFT and preference in one stage, with no
reference model (Hong et al. 2024, arXiv 2403.07691).

Pairs are DPO's (`recipes.dpo` loads and batches them). With m(y) = (1/|y|) Σ_t log πθ(y_t | x, y_<t), the mean
token log-prob of a completion, the loss of a step is
  L = NLL + λ · (1/P) Σ_pairs −log σ(log odds(y_c) − log odds(y_r)),   log odds(y) = m(y) − log(1 − e^m(y)),
P the step's pairs and NLL the mean token NLL of the step's chosen completions (`nll_tokens: all`: of the whole
chosen sequences, prompt included, as TRL's ORPOTrainer computes it); λ is `beta`.
Metrics (TRL's names): loss = L; nll_loss = the NLL term; rewards/chosen = mean λ·m(y_c), rewards/rejected =
mean λ·m(y_r), rewards/margins = their mean difference, rewards/accuracies = fraction of pairs with
m(y_c) > m(y_r); logps/chosen and logps/rejected = mean m(y); log_odds_ratio = mean log σ(log odds(y_c) −
log odds(y_r)) (the term's negative), log_odds_chosen = mean (log odds(y_c) − log odds(y_r)); pairs = pairs in
the step, tokens = non-padding tokens the policy read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from alignkit.config import ORPOConfig
from alignkit.data import packing
from alignkit.data.store import lengths
from alignkit.losses import mean_nll
from alignkit.losses.orpo import odds_ratio_loss
from alignkit.recipes.dpo import DPO, PairPass, chosen_tokens
from alignkit.training import loop
from alignkit.training.forward import pair_logps, unit_sequence_logps
from alignkit.training.loop import Data, StepResult
from alignkit.training.reference import NoReference

METRICS = ("loss", "nll_loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
           "logps/chosen", "logps/rejected", "log_odds_ratio", "log_odds_chosen")


class ORPO:
    name = "orpo"
    counts = ("pairs", "tokens")

    def __init__(self, cfg: ORPOConfig):
        self.cfg = cfg
        self.pairs = DPO(cfg)  # DPO's data, layouts and passes; its reference stays unused
        self.device = torch.device("cpu")

    def load_data(self, tokenizer, template: str) -> Data:
        return self.pairs.load_data(tokenizer, template)

    def longest_forward(self, rows: Sequence, device: torch.device) -> int:
        return self.pairs.longest_forward(rows, device)

    def reserved_bytes(self, model) -> float:
        return 0.0

    def setup(self, model, model_path, backend, data: Data) -> None:
        self.device = self.pairs.device = backend.device
        self.pairs.references = dict.fromkeys(("train", "eval"), NoReference(backend.device))

    def frozen_models(self) -> list:
        return []

    def describe(self, device: torch.device) -> str:
        return f"lambda (beta) {self.cfg.beta}, NLL over {self.cfg.nll_tokens} tokens, layout {self.pairs.layout}"

    def totals(self, batches: list[Sequence]) -> torch.Tensor:
        """Pairs, and the tokens the NLL is normalised by."""
        if self.cfg.nll_tokens == "all":
            tokens = sum(int((lengths(b)[:, 0] - 1).sum()) for b in batches if len(b))
        else:
            tokens = sum(chosen_tokens(b) for b in batches)
        return torch.tensor([float(sum(len(b) for b in batches)), float(tokens)])

    def units(self, batches: list[Sequence], split: str) -> list[PairPass]:
        return self.pairs.units(batches, split)

    def loss(self, model, unit: PairPass, totals: torch.Tensor) -> tuple[torch.Tensor, dict]:
        step_pairs, nll_tokens = totals.tolist()
        policy_c, policy_r, len_c, len_r, tokens = pair_logps(model, unit.pairs, self.pairs.layout,
                                                              self.pairs.pad_id, self.device)
        mean_c, mean_r = policy_c / len_c.clamp(min=1), policy_r / len_r.clamp(min=1)
        odds_loss, ratio = odds_ratio_loss(mean_c, mean_r)
        nll = mean_nll(policy_c if self.cfg.nll_tokens == "completion" else self.sequence_logps(model, unit),
                       nll_tokens)
        loss = nll + self.cfg.beta * odds_loss.sum() / step_pairs
        per_pair = {"rewards/chosen": self.cfg.beta * mean_c, "rewards/rejected": self.cfg.beta * mean_r,
                    "rewards/margins": self.cfg.beta * (mean_c - mean_r),
                    "rewards/accuracies": (mean_c > mean_r).float(),
                    "logps/chosen": mean_c, "logps/rejected": mean_r, "log_odds_ratio": -odds_loss,
                    "log_odds_chosen": ratio}
        sums = {k: v.detach().sum() / step_pairs for k, v in per_pair.items()}
        return loss, {"loss": loss, "nll_loss": nll, **sums, "tokens": tokens}

    def sequence_logps(self, model, unit: PairPass) -> torch.Tensor:
        """Σ log π over every token of each chosen sequence after the first, prompt included."""
        rows = [replace(p.chosen, labels=list(p.chosen.input_ids)) for p in unit.pairs]
        batch = packing.padded(rows, self.pairs.pad_id).to(self.device)
        return unit_sequence_logps(model, batch, len(rows))[0]

    def step_result(self, sums: dict, totals: torch.Tensor) -> StepResult:
        pairs = int(totals[0].item())
        return StepResult({k: sums[k].item() for k in METRICS}, pairs,
                          {"pairs": pairs, "tokens": int(sums["tokens"].item())})

    def eval_metrics(self, sums: dict) -> dict:
        return {f"eval/{k}": sums[k].item() for k in METRICS}

    def postfix(self, row: dict) -> dict:
        shown = {k: float("nan") if row.get(k) is None else row[k] for k in METRICS}
        return {"loss": f"{shown['loss']:.4f}", "nll": f"{shown['nll_loss']:.4f}",
                "acc": f"{shown['rewards/accuracies']:.2f}", "lr": f"{row['lr']:.1e}"}

    def summary(self, state, last: StepResult) -> dict:
        seconds, (pairs, tokens) = max(state.step_seconds, 1e-9), (state.counts["pairs"], state.counts["tokens"])
        return {**{k: last.means[k] for k in METRICS[1:] if k in last.means}, "trained_pairs": pairs,
                "tokens": tokens, "pairs_per_s": round(pairs / seconds, 3), "tokens_per_s": round(tokens / seconds, 1)}


def run(cfg: ORPOConfig) -> dict:
    """Train and save; returns the summary written to OUTPUT_DIR/summary.json."""
    return loop.run(cfg, ORPO(cfg))


def train(cfg: ORPOConfig):
    """Train and save; returns (summary, trained model, tokenizer) for callers that keep working with them."""
    return loop.fit(cfg, ORPO(cfg))
