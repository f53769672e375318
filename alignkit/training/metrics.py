"""`metrics.jsonl`: one JSON object per logged step, and the peak memory figure for the summary.

Training rows: step, epoch (fractional), loss (mean token NLL of the step), lr, grad_norm (before clipping),
tokens (trained tokens in the step, all processes), tokens_per_s (trained tokens per second over the steps
since the previous row), elapsed_s (seconds since training started, start-up excluded).
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
