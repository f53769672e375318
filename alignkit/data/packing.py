"""Batch layouts: how tokenised rows are laid out for one forward pass. All give the same log-probs.

| layout         | what                                                                      | fastest on              |
|----------------|---------------------------------------------------------------------------|-------------------------|
| `padded`       | rows padded on the right to the longest, a 2-D attention mask             | (the plain reference)   |
| `per_sequence` | one row per forward, no padding and no mask: SDPA's causal fast path      | CPU                     |
| `packed`       | rows packed best-fit-decreasing into bins of `max_length` tokens, each    | GPU                     |
|                | with its own position ids and a block-diagonal causal 4-D mask            |                         |
| `prefix_shared`| (DPO) per pair one row [prompt, chosen, rejected]: the prompt is encoded  | CPU and GPU             |
|                | once, both answers attend to it, their positions continue from its end    |                         |

Prefix sharing: "Accelerating Direct Preference Optimization with Prefix Sharing" (Wang & Hegde 2024,
arXiv 2410.20305). `../shared/PERF_NOTES.md` has the measurements behind the CPU choices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alignkit.data.batches import collate
from alignkit.data.tokenize import IGNORE, TokenizedRow


@dataclass
class Unit:
    """One forward pass worth of tokens."""

    input_ids: torch.Tensor  # [B, T]
    labels: torch.Tensor  # [B, T], IGNORE where untrained
    attention_mask: torch.Tensor | None = None  # [B, T] or a boolean [B, 1, T, T] (True = may attend)
    position_ids: torch.Tensor | None = None  # [B, T]
    sequence_ids: torch.Tensor | None = None  # [B, T]: which input row each token came from (packed layouts)

    def to(self, device) -> Unit:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return t.to(device) if t is not None else None

        return Unit(move(self.input_ids), move(self.labels), move(self.attention_mask), move(self.position_ids),
                    move(self.sequence_ids))


def padded(rows: list[TokenizedRow], pad_id: int) -> Unit:
    batch = collate(rows, pad_id)
    sequence_ids = torch.arange(len(rows))[:, None].expand_as(batch["input_ids"])
    return Unit(batch["input_ids"], batch["labels"], batch["attention_mask"], None, sequence_ids)


def single(row: TokenizedRow, index: int = 0) -> Unit:
    ids = torch.tensor([row.input_ids])
    return Unit(ids, torch.tensor([row.labels]), None, None, torch.full_like(ids, index))


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of row indices, longest rows first, each into the fullest bin it still fits."""
    bins: list[list[int]] = []
    space: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fits = [b for b in range(len(bins)) if space[b] >= lengths[i]]
        if fits:
            best = min(fits, key=lambda b: space[b])
            bins[best].append(i)
            space[best] -= lengths[i]
        else:
            bins.append([i])
            space.append(capacity - lengths[i])
    return bins


def block_causal_mask(segments: torch.Tensor) -> torch.Tensor:
    """[B, T] segment ids (−1 = padding) → boolean [B, 1, T, T]: causal within a segment, nothing across."""
    width = segments.shape[1]
    causal = torch.tril(torch.ones(width, width, dtype=torch.bool))
    same = segments[:, :, None] == segments[:, None, :]
    mask = causal & same
    mask |= torch.eye(width, dtype=torch.bool)  # padding attends to itself, so no softmax row is empty
    return mask[:, None]


def packed(rows: list[TokenizedRow], pad_id: int, capacity: int) -> Unit:
    lengths = [len(r.input_ids) for r in rows]
    bins = best_fit_decreasing(lengths, max(capacity, max(lengths)))
    width = max(sum(lengths[i] for i in b) for b in bins)
    input_ids = torch.full((len(bins), width), pad_id, dtype=torch.long)
    labels = torch.full((len(bins), width), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(bins), width), dtype=torch.long)
    sequence_ids = torch.full((len(bins), width), -1, dtype=torch.long)
    for b, members in enumerate(bins):
        at = 0
        for i in members:
            n = lengths[i]
            input_ids[b, at:at + n] = torch.tensor(rows[i].input_ids)
            # The first label of a row must not be predicted from the previous row's last token.
            labels[b, at:at + n] = torch.tensor([IGNORE] + rows[i].labels[1:])
            positions[b, at:at + n] = torch.arange(n)
            sequence_ids[b, at:at + n] = i
            at += n
    return Unit(input_ids, labels, block_causal_mask(sequence_ids), positions, sequence_ids)


def sft_units(rows: list[TokenizedRow], layout: str, pad_id: int, capacity: int) -> list[Unit]:
    """The forward passes of one micro-batch in the chosen layout."""
    if layout == "per_sequence":
        return [single(r) for r in rows]
    if layout == "packed":
        return [packed(rows, pad_id, capacity)]
    return [padded(rows, pad_id)]


@dataclass
class SharedPair:
    """A pair laid out as [shared prefix, chosen branch, rejected branch] for one forward pass."""

    unit: Unit
    chosen_at: torch.Tensor  # positions whose hidden state predicts each scored chosen token
    chosen_targets: torch.Tensor
    rejected_at: torch.Tensor
    rejected_targets: torch.Tensor


def _scored(labels: list[int], start: int, branch_offset: int, shared_len: int) -> tuple[list[int], list[int]]:
    """(predicting positions, targets) for a branch's trained tokens, in the shared layout."""
    at, targets = [], []
    for j in range(start, len(labels)):
        if labels[j] == IGNORE:
            continue
        # token j is predicted by token j-1: in the shared prefix if j-1 < shared_len, else in this branch
        at.append(j - 1 if j - 1 < shared_len else branch_offset + (j - 1 - shared_len))
        targets.append(labels[j])
    return at, targets


def prefix_shared(chosen: TokenizedRow, rejected: TokenizedRow) -> SharedPair:
    c, r = chosen.input_ids, rejected.input_ids
    first_trained = min(next(i for i, v in enumerate(chosen.labels) if v != IGNORE),
                        next(i for i, v in enumerate(rejected.labels) if v != IGNORE))
    shared = 0
    while shared < min(len(c), len(r), first_trained) and c[shared] == r[shared]:
        shared += 1
    c_branch, r_branch = c[shared:], r[shared:]
    total = shared + len(c_branch) + len(r_branch)
    segments = torch.tensor([0] * shared + [1] * len(c_branch) + [2] * len(r_branch))
    causal = torch.tril(torch.ones(total, total, dtype=torch.bool))
    # Shared tokens see the shared prefix; each branch sees the prefix and itself, never the other branch.
    visible = (segments[:, None] == segments[None, :]) | (segments[None, :] == 0)
    positions = list(range(shared)) + list(range(shared, len(c))) + list(range(shared, len(r)))
    c_at, c_targets = _scored(chosen.labels, 1, shared, shared)
    r_at, r_targets = _scored(rejected.labels, 1, shared + len(c_branch), shared)
    unit = Unit(torch.tensor([c[:shared] + c_branch + r_branch]), torch.full((1, total), IGNORE),
                (causal & visible)[None, None], torch.tensor([positions]))
    return SharedPair(unit, torch.tensor(c_at), torch.tensor(c_targets), torch.tensor(r_at), torch.tensor(r_targets))
