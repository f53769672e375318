"""The DPO reference model πref: where each pair's reference log-probs ℓref(y_c|x), ℓref(y_r|x) come from.

Four kinds, one method each, `logps(policy, pairs, layout)` → (chosen [P], rejected [P]):
  none         reference-free losses (SimPO): zeros
  copy         a frozen model: the initial policy reloaded from disk (so a resumed run keeps the same one), or
               `ref_model`
  adapter      the policy with its LoRA adapter switched off, which is the initial model
  precomputed  every pair scored once before training (by a copy or the adapter-off policy), kept as a tensor
               indexed by the pair's position in its set and cached on disk; no reference model is held
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from alignkit.data.prefs import PreferenceRow
from alignkit.data.sources import file_fingerprint
from alignkit.data.store import StoredRows
from alignkit.errors import RunError
from alignkit.log import log
from alignkit.models.load import load_model, resolve_model
from alignkit.paths import cache_root
from alignkit.training.backend import Backend
from alignkit.training.forward import pair_logps


class NoReference:
    kind = "none"
    model = None

    def __init__(self, device):
        self.device = device

    def logps(self, policy, pairs: list[PreferenceRow], layout: str) -> tuple[torch.Tensor, torch.Tensor]:
        zeros = torch.zeros(len(pairs), device=self.device)
        return zeros, zeros


class FrozenModel:
    kind = "copy"

    def __init__(self, model, pad_id: int, device):
        self.model, self.pad_id, self.device = model, pad_id, device

    @torch.no_grad()
    def logps(self, policy, pairs: list[PreferenceRow], layout: str) -> tuple[torch.Tensor, torch.Tensor]:
        return pair_logps(self.model, pairs, layout, self.pad_id, self.device)[:2]


class AdapterOff:
    kind = "adapter"
    model = None

    def __init__(self, pad_id: int, device):
        self.pad_id, self.device = pad_id, device

    @torch.no_grad()
    def logps(self, policy, pairs: list[PreferenceRow], layout: str) -> tuple[torch.Tensor, torch.Tensor]:
        # No gradient flows here, so the model inside a DDP wrapper can be called directly; eval mode turns
        # dropout off, as the initial model had none.
        inner = getattr(policy, "module", policy)
        was_training = inner.training
        inner.eval()
        with inner.disable_adapter():
            chosen, rejected = pair_logps(inner, pairs, layout, self.pad_id, self.device)[:2]
        inner.train(was_training)
        return chosen, rejected


class Precomputed:
    kind = "precomputed"
    model = None

    def __init__(self, logps: torch.Tensor, device):
        self.stored, self.device = logps, device  # [pairs of the set, 2]: (chosen, rejected)

    def logps(self, policy, pairs: list[PreferenceRow], layout: str) -> tuple[torch.Tensor, torch.Tensor]:
        positions = [pair.position for pair in pairs]
        if not all(0 <= p < len(self.stored) for p in positions):
            raise RunError(f"a pair without its place among the {len(self.stored)} scored pairs (position "
                           f"{positions}): precomputed reference log-probs need the pairs of the set they were "
                           "computed for")
        rows = self.stored[positions].to(self.device, torch.float32)
        return rows[:, 0], rows[:, 1]


def kind_for(cfg, reference_free: bool = False) -> str:
    """`cfg.reference`, with auto resolved: none for reference-free losses, the base under the adapter for LoRA
    without ref_model, else a frozen copy. PiSSA and OLoRA change the base under the adapter: it is no longer the
    initial policy, so they get a copy."""
    if cfg.reference != "auto":
        return cfg.reference
    if reference_free:
        return "none"
    return "adapter" if cfg.lora and cfg.ref_model is None and cfg.lora_init == "default" else "copy"


def build(cfg, kind: str, model_path: Path, backend: Backend, pad_id: int):
    """The reference of `kind` (see `config.DPOConfig.reference`); `precomputed` first builds the reference it
    scores with (a frozen copy, or the adapter-off policy under LoRA without ref_model)."""
    adapter_source = cfg.lora and cfg.ref_model is None and cfg.lora_init == "default"  # see kind_for
    if kind == "none":
        return NoReference(backend.device)
    if kind == "adapter" or (kind == "precomputed" and adapter_source):
        return AdapterOff(pad_id, backend.device)
    dtype = torch.bfloat16 if cfg.dtype == "bf16" else torch.float32
    source = resolve_model(cfg.ref_model) if cfg.ref_model is not None else model_path
    return FrozenModel(backend.frozen(load_model(source, dtype, cfg.trust_remote_code)), pad_id,
                       backend.device)


def for_splits(cfg, kind: str, model, model_path: Path, backend: Backend, pad_id: int, sets: dict[str, Sequence],
               layout: str) -> dict:
    """Each split's reference (train, eval): one shared reference of `kind`, or each split's own precomputed
    scores of its pairs."""
    ref = build(cfg, kind, model_path, backend, pad_id)
    if kind != "precomputed":
        return dict.fromkeys(sets, ref)
    model.to(backend.device)
    scored = precompute(ref, model, list(sets.values()), cfg, layout, backend, model_path)
    return dict(zip(sets, scored, strict=True))


def precompute(scorer, policy, pair_sets: list[Sequence], cfg, layout: str, backend: Backend,
               model_path: Path) -> list[Precomputed]:
    """Score every pair of each set under `scorer` once (cached on disk); a `Precomputed` per set.

    The cache key covers the model, the settings and every pair's tokens and labels, chosen and rejected."""
    digest = hashlib.sha256()
    for part in (str(model_path), cfg.ref_model or "", file_fingerprint([str(f) for f in model_path.glob("*")]),
                 str(cfg.lora), backend.accelerator.mixed_precision):
        digest.update(part.encode())
    for pairs in pair_sets:
        digest.update(pairs_fingerprint(pairs).encode())
    cache = cache_root() / "reference-logps" / f"{digest.hexdigest()[:24]}.safetensors"
    sizes = [len(pairs) for pairs in pair_sets]
    stored = _cached(cache, sum(sizes))
    if stored is None:
        stored = _score(scorer, policy, pair_sets, cfg.batch_size, layout, backend)
        if backend.is_main:
            _write(cache, stored)
    backend.release(getattr(scorer, "model", None))  # the scores are all that training needs of it
    return [Precomputed(part, backend.device) for part in stored.split(sizes)]


def _cached(cache: Path, pairs: int) -> torch.Tensor | None:
    """The cached scores, or None when there are none or they are damaged (then they are scored again)."""
    if not cache.is_file():
        return None
    try:
        stored = load_file(cache)["logps"]
    except Exception:  # a half-written or foreign file: scoring again costs a pass over the pairs
        log(f"{cache}: unreadable reference log-probs; scoring the pairs again")
        return None
    if stored.shape != (pairs, 2):
        return None
    log("reference log-probs loaded from cache")
    return stored


def _write(cache: Path, stored: torch.Tensor) -> None:
    """Written beside and renamed into place, so that a crash or a full disk never leaves half a file."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    staging = cache.with_name(f".{cache.name}.{os.getpid()}")
    save_file({"logps": stored.contiguous()}, str(staging))
    os.replace(staging, cache)


def _score(scorer, policy, pair_sets: list[Sequence], batch_size: int, layout: str, backend: Backend) -> torch.Tensor:
    scores = []
    progress = tqdm(total=sum(len(p) for p in pair_sets), desc="reference log-probs", disable=not backend.is_main)
    for pairs in pair_sets:
        for start in range(0, len(pairs), batch_size):
            chunk = [pairs[i] for i in range(start, min(start + batch_size, len(pairs)))]
            with backend.autocast():
                chosen, rejected = scorer.logps(policy, chunk, layout)
            scores.append(torch.stack([chosen.float(), rejected.float()], dim=1).cpu())
            progress.update(len(chunk))
    progress.close()
    return torch.cat(scores) if scores else torch.zeros((0, 2))


def pairs_fingerprint(pairs: Sequence) -> str:
    """Identifies the pairs' tokens and labels, chosen and rejected, in order."""
    if isinstance(pairs, StoredRows):
        return pairs.content_hash()
    digest = hashlib.sha256()
    for p in pairs:
        digest.update(json.dumps([p.chosen.input_ids, p.chosen.labels, p.rejected.input_ids,
                                  p.rejected.labels]).encode())
    return digest.hexdigest()
