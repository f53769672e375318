"""alignkit's progress lines: one line each, on stderr, from the main process only."""

from __future__ import annotations

import os
import sys


def log(message: str) -> None:
    """A progress line on stderr, from the main process only when several run (torchrun, accelerate launch)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"alignkit: {message}", file=sys.stderr, flush=True)
