"""Where alignkit keeps what it fetches and builds once: models, tokenised data, reference log-probs."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$ALIGNKIT_CACHE, or ~/.cache/alignkit."""
    return Path(os.environ.get("ALIGNKIT_CACHE", Path.home() / ".cache" / "alignkit"))
