"""Forward passes in each batch layout (see `alignkit.data.packing`): rows in, log-probabilities (or rewards) out."""

from __future__ import annotations

import torch

from alignkit.data import packing
from alignkit.data.packing import Unit, prefix_shared
from alignkit.data.prefs import PreferenceRow
from alignkit.models.load import transformers_model
from alignkit.models.logprobs import final_hidden, head_logprobs, label_logprobs, layer_masks, output_head


def unit_sequence_logps(model, unit: Unit, num_sequences: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ log π over each input row's trained tokens, and each row's trained-token count: two [S] tensors."""
    logps, rows, cols = label_logprobs(model, unit.input_ids, unit.labels, unit.attention_mask, unit.position_ids)
    sequence = unit.sequence_ids[:, 1:][rows, cols] if unit.sequence_ids is not None else rows
    sums = torch.zeros(num_sequences, device=logps.device, dtype=logps.dtype).index_add(0, sequence, logps)
    counts = torch.zeros(num_sequences, device=logps.device).index_add(0, sequence, torch.ones_like(logps))
    return sums, counts


def pair_logps(model, pairs: list[PreferenceRow], layout: str, pad_id: int, device) -> tuple:
    """ℓ(y_c), ℓ(y_r), |y_c|, |y_r| per pair ([P] each), and the tokens read, in the chosen layout."""
    if layout == "prefix_shared":
        results = [_shared_pair_logps(model, p, device) for p in pairs]
        stacked = [torch.stack([r[k] for r in results]) for k in range(4)]
        return (*stacked, sum(int(r[4]) for r in results))
    rows = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    if layout == "per_sequence":
        parts = [unit_sequence_logps(model, packing.single(row).to(device), 1) for row in rows]
        sums, counts = torch.cat([s for s, _ in parts]), torch.cat([c for _, c in parts])
        tokens = sum(len(r.input_ids) for r in rows)
    else:
        unit = packing.padded(rows, pad_id).to(device)
        sums, counts = unit_sequence_logps(model, unit, len(rows))
        tokens = int(unit.attention_mask.sum())
    chosen, rejected = sums.chunk(2)
    chosen_len, rejected_len = counts.chunk(2)
    return chosen, rejected, chosen_len, rejected_len, tokens


def _shared_pair_logps(model, pair: PreferenceRow, device) -> tuple:
    shared = prefix_shared(pair.chosen, pair.rejected)
    unit = shared.unit.to(device)
    hidden = final_hidden(model, unit.input_ids, unit.attention_mask, unit.position_ids)[0]
    head, softcap = output_head(model)
    chosen = head_logprobs(hidden[shared.chosen_at.to(device)], head, shared.chosen_targets.to(device), softcap)
    rejected = head_logprobs(hidden[shared.rejected_at.to(device)], head, shared.rejected_targets.to(device),
                             softcap)
    n_c = torch.tensor(float(len(shared.chosen_targets)), device=device)
    n_r = torch.tensor(float(len(shared.rejected_targets)), device=device)
    return chosen.sum(), rejected.sum(), n_c, n_r, unit.input_ids.shape[1]


def pair_rewards(model, pairs: list[PreferenceRow], layout: str, pad_id: int, device) -> tuple:
    """r(y_c), r(y_r) per pair ([P] float32 each) from a one-output sequence-classification model, and the tokens
    read. Each sequence is scored at its last token that is not `pad_id`, as transformers' pooling does."""
    if layout == "prefix_shared":
        results = [_shared_pair_rewards(model, p, pad_id, device) for p in pairs]
        return (torch.stack([r[0] for r in results]), torch.stack([r[1] for r in results]),
                sum(r[2] for r in results))
    unit = packing.padded([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id).to(device)
    rewards = model(input_ids=unit.input_ids, attention_mask=unit.attention_mask, use_cache=False).logits
    chosen, rejected = rewards[:, 0].float().chunk(2)
    return chosen, rejected, int(unit.attention_mask.sum())


def _shared_pair_rewards(model, pair: PreferenceRow, pad_id: int, device) -> tuple:
    shared = prefix_shared(pair.chosen, pair.rejected)
    unit = shared.unit.to(device)
    c, r = pair.chosen.input_ids, pair.rejected.input_ids
    common = len(c) + len(r) - unit.input_ids.shape[1]
    at_c, at_r = last_scored(c, pad_id), last_scored(r, pad_id)
    if at_r >= common:  # the rejected branch follows the chosen one
        at_r += len(c) - common
    scores = score_outputs(model, unit.input_ids, unit.attention_mask, unit.position_ids)[0, :, 0].float()
    return scores[at_c], scores[at_r], unit.input_ids.shape[1]


def last_scored(ids: list[int], pad_id: int) -> int:
    """The rightmost position whose token is not `pad_id` (0 when there is none, as transformers' argmax gives)."""
    return next((i for i in range(len(ids) - 1, -1, -1) if ids[i] != pad_id), 0)


def score_outputs(model, input_ids: torch.Tensor, attention_mask, position_ids) -> torch.Tensor:
    """The score head's output at every position [B, T, 1], caught by a forward hook while the whole model is
    called (so DDP and FSDP wrappers see the call); the model's own pooling picks one position per row, which a
    prefix-shared row holding two sequences cannot use."""
    inner = transformers_model(model)
    head = getattr(inner, "score", None) or inner.classifier
    caught = []
    handle = head.register_forward_hook(lambda _module, _args, output: caught.append(output))
    try:
        model(input_ids=input_ids, attention_mask=layer_masks(model, attention_mask, position_ids),
              position_ids=position_ids, use_cache=False)
    finally:
        handle.remove()
    return caught[0]
