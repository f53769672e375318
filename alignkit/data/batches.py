"""Tokenised rows → micro-batches: a seeded shuffle per epoch, right padding, and a resumable position."""

from __future__ import annotations

import torch

from alignkit.data.tokenize import IGNORE, TokenizedRow


def epoch_order(num_rows: int, seed: int, epoch: int) -> list[int]:
    """The row order of one epoch: a permutation that depends only on (seed, epoch), so resuming can rebuild it."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(num_rows, generator=generator).tolist()


def micro_batches(rows: list[TokenizedRow], batch_size: int, seed: int, epoch: int,
                  rank: int = 0, world_size: int = 1) -> list[list[TokenizedRow]]:
    """This process's micro-batches for one epoch; processes take interleaved batches, none shared or lost."""
    order = epoch_order(len(rows), seed, epoch)
    batches = [[rows[i] for i in order[start:start + batch_size]] for start in range(0, len(order), batch_size)]
    return batches[rank::world_size]


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

