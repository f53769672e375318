"""SFT as an objective on the training loop (`training.loop.fit`).

Loss of a step: −(1/N) Σ log π(y_t | y_<t, x) over every trained (assistant) token of the step, N their number
over all micro-batches and processes (`losses.sft.mean_nll`). Metrics: loss = that mean token NLL, tokens =
trained tokens; eval/loss and eval/ppl = exp(eval/loss) over the held-out rows, eval/tokens their trained tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from alignkit.config import SFTConfig
from alignkit.data.cache import load_sft_rows
from alignkit.data.mixture import load_mixture, log_mixture
from alignkit.data.packing import sft_units
from alignkit.data.store import lengths
from alignkit.data.tokenize import Rendering, merge_stats, trained_label_count
from alignkit.errors import UserError
from alignkit.log import log
from alignkit.losses import mean_nll
from alignkit.models import neftune
from alignkit.training import loop
from alignkit.training.data_order import split_eval
from alignkit.training.forward import unit_sequence_logps
from alignkit.training.loop import Data, StepResult


class SFT:
    name = "sft"
    counts = ("tokens",)

    def __init__(self, cfg: SFTConfig):
        self.cfg = cfg
        self.device = torch.device("cpu")
        self.pad_id = 0
        self.neftune = None  # the noise hook's handle, removed once training ends

    def load_data(self, tokenizer, template: str) -> Data:
        self.pad_id = tokenizer.pad_token_id
        return load_data(self.cfg, tokenizer, template)

    def longest_forward(self, rows: Sequence, device: torch.device) -> int:
        longest = int(lengths(rows).max())
        return {"packed": self.cfg.batch_size * max(self.cfg.max_length, longest),  # up to a bin per row
                "padded": self.cfg.batch_size * longest}.get(resolve_layout(self.cfg.layout, device), longest)

    def reserved_bytes(self, model) -> float:
        return 0.0

    def setup(self, model, model_path, backend, data: Data) -> None:
        self.device = backend.device
        if self.cfg.neftune_noise_alpha:
            self.neftune = neftune.attach(model, self.cfg.neftune_noise_alpha)

    def frozen_models(self) -> list:
        return []

    def describe(self, device: torch.device) -> str:
        return f"layout {resolve_layout(self.cfg.layout, device)}"

    def totals(self, batches: list[Sequence]) -> torch.Tensor:
        return torch.tensor([float(sum(trained_label_count(rows) for rows in batches))])

    def units(self, batches: list[Sequence], split: str) -> list:
        """On the CPU until their pass: an evaluation's units are made all at once."""
        layout = resolve_layout(self.cfg.layout, self.device)
        return [u for rows in batches for u in sft_units(rows, layout, self.pad_id, self.cfg.max_length)]

    def loss(self, model, unit, totals: torch.Tensor) -> tuple[torch.Tensor, dict]:
        unit = unit.to(self.device)
        sums, counts = unit_sequence_logps(model, unit, 1 if unit.sequence_ids is None else
                                           int(unit.sequence_ids.max()) + 1)
        return mean_nll(sums, totals[0]), {"nll": -sums.sum(), "tokens": counts.sum()}

    def step_result(self, sums: dict, totals: torch.Tensor) -> StepResult:
        tokens = int(totals[0].item())
        return StepResult({"loss": sums["nll"].item() / tokens}, tokens, {"tokens": tokens})

    def eval_metrics(self, sums: dict) -> dict:
        loss = (sums["nll"] / sums["tokens"].clamp(min=1)).item()
        return {"eval/loss": loss, "eval/ppl": math.exp(min(loss, 50.0)), "eval/tokens": int(sums["tokens"].item())}

    def postfix(self, row: dict) -> dict:
        return {"loss": f"{float('nan') if row['loss'] is None else row['loss']:.4f}", "lr": f"{row['lr']:.2e}",
                "tok_s": f"{row['tokens_per_s']:.0f}"}

    def summary(self, state, last: StepResult) -> dict:
        tokens = state.counts["tokens"]
        return {"trained_tokens": tokens, "tokens_per_s": round(tokens / max(state.step_seconds, 1e-9), 1)}


def resolve_layout(layout: str, device: torch.device) -> str:
    """auto: one sequence per forward on CPU (SDPA's unmasked fast path), packed rows on GPU."""
    if layout != "auto":
        return layout
    return "packed" if device.type == "cuda" else "per_sequence"


def load_data(cfg: SFTConfig, tokenizer, template: str) -> Data:
    """Training rows drawn from the data sources, eval rows, and what the summary says of them."""
    def load_source(path: str):
        rows, stats, cached = load_sft_rows([path], cfg.data_format, tokenizer, template, cfg.max_length,
                                            on_bad_row=cfg.on_bad_row, num_proc=cfg.num_proc,
                                            rendering=Rendering.of(cfg))
        if cached:
            log(f"{path}: tokenised rows loaded from cache")
        return rows, stats

    train, source_stats, sources = load_mixture(cfg.data, cfg.mix_total, cfg.seed, load_source, trained_label_count)
    stats = merge_stats(source_stats)
    eval_rows: Sequence = []
    if cfg.eval_data:
        eval_rows, _, _ = load_sft_rows(cfg.eval_data, cfg.data_format, tokenizer, template, cfg.max_length,
                                        on_bad_row=cfg.on_bad_row, num_proc=cfg.num_proc,
                                        rendering=Rendering.of(cfg))
    else:
        train, eval_rows = split_eval(train, cfg.eval_fraction, cfg.seed)
    if not train:
        raise UserError("no training rows: the data mixture drew none" if stats.rows else
                        "no training rows left after dropping rows whose prompt alone exceeds max_length")
    if stats.dropped:
        shown = ", ".join(stats.dropped_origins[:3])
        log(f"dropped {stats.dropped} rows whose prompt alone fills max_length={cfg.max_length} (e.g. {shown})")
    if stats.repaired:
        log(f"repaired {stats.repaired} conversations (see data_format in docs/sft.md), e.g. {stats.repaired_rows[0]}")
    if stats.skipped:
        log(f"skipped {stats.skipped} bad rows (on_bad_row: skip), e.g. {stats.skipped_rows[0]}")
    log_mixture(sources, "rows")
    rows = {"truncated": stats.truncated, "dropped": stats.dropped, "skipped": stats.skipped,
            "skipped_examples": stats.skipped_rows, "repaired": stats.repaired,
            "repaired_examples": stats.repaired_rows}
    return Data(train, eval_rows, rows, sources)


def run(cfg: SFTConfig) -> dict:
    """Train and save; returns the summary written to OUTPUT_DIR/summary.json."""
    return loop.run(cfg, SFT(cfg))


def train(cfg: SFTConfig):
    """Train and save; returns (summary, trained model, tokenizer) for callers that keep working with them."""
    objective = SFT(cfg)
    try:
        return loop.fit(cfg, objective)
    finally:
        if objective.neftune is not None:  # the returned model generates without noise whatever its mode
            objective.neftune.remove()
