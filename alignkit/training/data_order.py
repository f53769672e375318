"""The order rows are trained in: a held-out split, steps per epoch, and a stream of steps that resumes
mid-epoch from a saved position (epoch, index of the next micro-batch)."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from alignkit.data.batches import batch_positions, tail_rows
from alignkit.data.store import take
from alignkit.errors import UserError


def split_eval(rows: Sequence, fraction: float, seed: int) -> tuple[Sequence, Sequence]:
    """(training rows, held-out rows): a seeded `fraction` of the rows held out, both kept in their order."""
    if fraction <= 0:
        return rows, []
    if not rows:
        raise UserError("no usable rows to train on (every row was skipped as bad or dropped as too long)")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(fraction * len(rows)))
    if n_eval >= len(rows):
        raise UserError(f"eval_fraction {fraction} leaves no training rows out of {len(rows)}")
    held = set(order[:n_eval])
    return (take(rows, [i for i in range(len(rows)) if i not in held]),
            take(rows, [i for i in range(len(rows)) if i in held]))


def steps_per_epoch(num_batches: int, grad_accum: int) -> int:
    return math.ceil(num_batches / grad_accum)


def step_stream(rows: Sequence, cfg, epoch: int, index: int, rank: int, world: int):
    """Yield (micro-batches of one step, epoch, index after it), endlessly, from a saved position.

    Only the step's rows are read from `rows` (stored rows become Python lists one step at a time). Empty
    micro-batches (this process's share of a short last global batch) are left out, so a process can get a
    step without rows; the back end gives it the passes the others wait for (`Backend.equal_passes`)."""
    while True:
        batches = batch_positions(len(rows), cfg.batch_size, cfg.seed, epoch, rank, world)
        while index < len(batches):
            live = [[rows[i] for i in b] for b in batches[index:index + cfg.grad_accum] if b]
            index = min(index + cfg.grad_accum, len(batches))
            yield live, epoch, index
        epoch, index = epoch + 1, 0


def describe_tail(num_rows: int, batch_size: int, world: int) -> str:
    """The log line about an epoch's short last global batch, or '' when the rows divide evenly."""
    tail = tail_rows(num_rows, batch_size, world)
    if not tail:
        return ""
    return (f"{tail} rows of the last partial global batch of each epoch are trained as a smaller batch "
            f"(split over {world} processes)" if world > 1 else
            f"{tail} rows of the last partial batch of each epoch are trained as a smaller batch")
