"""Tokenised rows → micro-batches: a seeded shuffle per epoch, right padding, and a resumable position."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from alignkit.data.tokenize import IGNORE, TokenizedRow


def epoch_order(num_rows: int, seed: int, epoch: int) -> list[int]:
    """The row order of one epoch: a permutation that depends only on (seed, epoch), so resuming can rebuild it."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(num_rows, generator=generator).tolist()


def batch_positions(num_rows: int, batch_size: int, seed: int, epoch: int, rank: int = 0,
                    world_size: int = 1) -> list[list[int]]:
    """This process's micro-batches for one epoch, as row positions: the same count on every process, no row
    shared or lost.

    The epoch's order is cut into global batches of batch_size × world_size rows and process r takes the r-th
    slice of each, so the processes together see exactly the batches one process with batch_size × world_size
    would. The last global batch may be short; its rows are split as evenly as possible, and a process gets an
    empty micro-batch when it holds fewer rows than there are processes. Equal counts matter: under DDP or FSDP
    every process must take part in every step's collectives, or the others wait for it forever."""
    order = epoch_order(num_rows, seed, epoch)
    width = batch_size * world_size
    batches = []
    for start in range(0, len(order), width):
        chunk = order[start:start + width]
        begin, end = len(chunk) * rank // world_size, len(chunk) * (rank + 1) // world_size
        batches.append(chunk[begin:end])
    return batches


def micro_batches(rows: Sequence, batch_size: int, seed: int, epoch: int, rank: int = 0,
                  world_size: int = 1) -> list[list]:
    """The rows of `batch_positions` (every micro-batch of the epoch at once: for small sets and tests)."""
    return [[rows[i] for i in batch]
            for batch in batch_positions(len(rows), batch_size, seed, epoch, rank, world_size)]


def tail_rows(num_rows: int, batch_size: int, world_size: int) -> int:
    """Rows in the last, short global batch of an epoch (0 when the rows divide into global batches)."""
    return num_rows % (batch_size * world_size)


def collate(rows: list[TokenizedRow], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest row on the right; padding is masked out of attention and loss."""
    width = max(len(r.input_ids) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row.input_ids)
        input_ids[i, :n] = torch.tensor(row.input_ids)
        labels[i, :n] = torch.tensor(row.labels)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}

