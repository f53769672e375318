"""`metrics.jsonl`: one JSON object per logged step, and the peak memory figure for the summary.

Training rows describe the steps since the previous row (`logging_steps` of them): step (the last), epoch
(fractional), loss (mean token NLL over those steps' trained tokens), lr and grad_norm (before clipping) of the
last step, tokens (trained tokens of those steps, all processes), tokens_per_s (their trained tokens per second
of step time), elapsed_s (seconds since training started, start-up excluded), and `skipped: true` when one of
them had a NaN/Inf loss or gradient norm (it is left out of the averages; loss is null when all were).
Evaluation rows: step, epoch and keys prefixed `eval/`: eval/loss (mean token NLL over the evaluation
set's trained tokens), eval/ppl (exp of eval/loss), eval/tokens.
"""

from __future__ import annotations

import json
import math
import resource
import sys
from pathlib import Path

import torch


class Window:
    """The steps since the last logged row: per-step means averaged with weights (tokens for SFT losses, pairs
    for DPO metrics), counts summed, step time added up; a skipped (non-finite) step counts in time and totals
    but not in the averages."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.weight = 0.0
        self.totals: dict[str, int] = {}
        self.seconds = 0.0
        self.skipped = False

    def add(self, means: dict[str, float], weight: float, totals: dict[str, int], seconds: float,
            applied: bool) -> None:
        for name, value in totals.items():
            self.totals[name] = self.totals.get(name, 0) + value
        self.seconds += seconds
        for name, value in means.items():
            self.sums.setdefault(name, 0.0)
            if applied:
                self.sums[name] += value * weight
        if applied:
            self.weight += weight
        self.skipped |= not applied

    def row(self) -> dict:
        means = {name: (total / self.weight if self.weight else None) for name, total in self.sums.items()}
        rate = self.totals.get("tokens", 0) / max(self.seconds, 1e-9)
        return {**means, **self.totals, "tokens_per_s": round(rate, 1), **({"skipped": True} if self.skipped else {})}


class MetricsLog:
    def __init__(self, path: Path, keep_until_step: int | None = None, tracking=None):
        """Open for appending; on resume, rows after the checkpoint's step are dropped (they will be redone).

        `tracking` (see `training.tracking`) receives every row too, so trackers and the file never disagree."""
        self.path = path
        self.tracking = tracking
        kept = []
        if keep_until_step is not None and path.is_file():
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # the half line a killed process may leave: redone after resume
                    continue
                if row.get("step", 0) <= keep_until_step:
                    kept.append(line)
        path.write_text("".join(line + "\n" for line in kept))
        self.handle = open(path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the run

    def write(self, row: dict) -> None:
        # NaN/Inf are not JSON: a skipped step's loss is written as null
        clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
        self.handle.write(json.dumps(clean) + "\n")
        self.handle.flush()
        if self.tracking is not None:
            self.tracking.log(clean)

    def close(self) -> None:
        self.handle.close()
        if self.tracking is not None:
            self.tracking.close()


def peak_memory_mib(device: torch.device) -> float:
    """Peak allocated GPU memory, or the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux
