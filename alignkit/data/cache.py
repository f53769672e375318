"""Tokenised data, cached: a data file is tokenised once into a token store (`alignkit.data.store`) and every
later run with the same data, tokenizer, template and settings memory-maps that store instead.

The cache key covers what changes the tokens: the files' paths, sizes and modification times, the row format, the
tokenizer's vocabulary and rules, its special tokens (templates render them), the chat template, max_length, the
kind of rows (SFT rows or DPO pairs), train_reasoning and enable_thinking. Neither the number of worker processes
nor on_bad_row is part of it: a store holds the rows that are not bad, and a run under `on_bad_row: error` that
opens a store built under `skip` with bad rows in it stops at the first of them, as building it would have.

One process builds a store at a time: a lock file beside it is held while building, so another run (or another
process of the same distributed run) waits, then opens the finished store; if the builder failed, the next one
builds it and meets the same error. Temporary folders left by a builder that was killed are removed then.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
from contextlib import contextmanager
from pathlib import Path

from alignkit.data.engine import Job, auto_processes, build_store, encode_rows, new_stats
from alignkit.data.sources import file_fingerprint, read_rows
from alignkit.data.store import StoredRows, TokenStore
from alignkit.data.tokenize import PLAIN, Rendering, check_prompt_lengths, plain_backend
from alignkit.errors import UserError
from alignkit.paths import cache_root

CACHE_VERSION = "4"  # bump when tokenisation rules change, so old caches are not reused


def tokenizer_fingerprint(tokenizer) -> str:
    """The vocabulary and rules, not the padding a previous call left set."""
    backend = plain_backend(tokenizer) if getattr(tokenizer, "backend_tokenizer", None) is not None else None
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(vocab.encode()).hexdigest()


def cache_key(paths: list[str], job: Job) -> str:
    special = json.dumps(job.tokenizer.special_tokens_map, sort_keys=True, default=str)
    parts = [CACHE_VERSION, job.kind, file_fingerprint(paths), job.data_format, tokenizer_fingerprint(job.tokenizer),
             special, job.template, str(job.max_length), f"train_reasoning={job.rendering.train_reasoning}",
             f"enable_thinking={job.rendering.enable_thinking}"]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:24]


def load_stored(paths: list[str], job: Job, num_proc: int | None = None) -> tuple[StoredRows, object, bool]:
    """(the rows, the statistics of their tokenisation, whether they came from the cache)."""
    folder = cache_root() / "tokenized" / cache_key(paths, job)
    store, built = TokenStore.open(folder), None
    if store is None:
        with _building(folder):
            store = TokenStore.open(folder)  # built by another process while this one waited
            if store is None:
                store, built = build_store(paths, job, folder, auto_processes(paths, num_proc))
    stats = built or _stats_of(store, job.kind)
    if job.on_bad_row == "error" and stats.skipped:
        raise UserError(stats.skipped_rows[0])
    check_prompt_lengths(stats, job.max_length, job.on_bad_row)
    return StoredRows.of(store), stats, built is None


def _stats_of(store: TokenStore, kind: str):
    stats = new_stats(kind)
    for name, value in store.stats.items():
        setattr(stats, name, value)
    return stats


@contextmanager
def _building(folder: Path):
    """Hold the store's build lock; remove what killed builders left behind."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for stale in folder.parent.glob(f".{folder.name}.building-*"):
            shutil.rmtree(stale, ignore_errors=True)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def load_sft_rows(paths: list[str], data_format: str, tokenizer, template: str, max_length: int,
                  use_cache: bool = True, on_bad_row: str = "error", num_proc: int | None = None,
                  rendering: Rendering = PLAIN):
    """SFT rows of `paths` (stored rows, or with use_cache=False a list), their statistics, whether cached."""
    job = Job("sft", tokenizer, template, max_length, data_format, on_bad_row, rendering)
    if use_cache:
        return load_stored(paths, job, num_proc)
    rows, stats = encode_rows(job, read_rows(paths))
    check_prompt_lengths(stats, max_length, on_bad_row)
    return rows, stats, False


def load_pair_rows(paths: list[str], tokenizer, template: str, max_length: int, on_bad_row: str = "error",
                   num_proc: int | None = None, rendering: Rendering = PLAIN):
    """DPO pairs of `paths` as stored rows, their statistics, and whether they came from the cache."""
    return load_stored(paths, Job("dpo", tokenizer, template, max_length, "auto", on_bad_row, rendering), num_proc)


def load_feedback_rows(paths: list[str], tokenizer, template: str, max_length: int, on_bad_row: str = "error",
                       num_proc: int | None = None, rendering: Rendering = PLAIN):
    """KTO rows of `paths` (`data.feedback.FeedbackRow`) as stored rows, their statistics, whether cached."""
    return load_stored(paths, Job("kto", tokenizer, template, max_length, "auto", on_bad_row, rendering), num_proc)
