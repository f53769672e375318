"""What training makes of its data, in words: rows with their trained spans, and the counts of the whole set.

`alignkit data inspect` prints it; every training run writes it to RUN/data.json, which the dashboard shows.
Counts: rows, tokens (after truncation), trained tokens (labels that enter the loss, after the shift), the
trained fraction (trained / tokens), the longest row, and the data statistics of the run (truncated, dropped,
repaired, skipped, with examples).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from alignkit.data.store import lengths, trained_counts
from alignkit.data.tokenize import IGNORE

SHOWN = 5  # rows a run's data.json shows


def trained_segments(tokenizer, input_ids: list[int], labels: list[int]) -> list[tuple[str, bool]]:
    """The row's text cut into runs of trained and untrained tokens, in order."""
    pieces, start = [], 0
    trained = [label != IGNORE for label in labels]
    for end in range(1, len(input_ids) + 1):
        if end == len(input_ids) or trained[end] != trained[start]:
            pieces.append((tokenizer.decode(input_ids[start:end]), trained[start]))
            start = end
    return pieces


def row_view(row, tokenizer) -> dict:
    """A row (an SFT sequence, or a pair's chosen and rejected) as its origin and its sides' segments; a side's
    `trained` counts the labels that enter the loss (after the shift: the first token is never predicted)."""
    sides = [("", row)] if hasattr(row, "input_ids") else [("chosen", row.chosen), ("rejected", row.rejected)]
    return {"origin": row.origin,
            "sides": [{"name": name, "tokens": len(seq.input_ids),
                       "trained": sum(1 for label in seq.labels[1:] if label != IGNORE),  # as counts() does
                       "segments": trained_segments(tokenizer, seq.input_ids, seq.labels)} for name, seq in sides]}


def counts(rows: Sequence, max_length: int) -> dict:
    sizes = lengths(rows) if len(rows) else np.zeros((0, 1), dtype=np.int64)
    tokens = int(sizes.sum())
    trained = int(trained_counts(rows).sum()) if len(rows) else 0
    return {"rows": len(rows), "tokens": tokens, "trained_tokens": trained,
            "trained_fraction": trained / tokens if tokens else 0.0, "max_length": max_length,
            "longest": int(sizes.max()) if len(rows) else 0}


def data_view(rows: Sequence, statistics: dict, tokenizer, max_length: int, shown: int = SHOWN) -> dict:
    """The view of a run's training rows: its counts, its statistics and the first `shown` rows."""
    return {**counts(rows, max_length), "statistics": statistics,
            "shown": [row_view(rows[i], tokenizer) for i in range(min(shown, len(rows)))]}
