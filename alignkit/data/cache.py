"""Tokenised data, cached: a data file is tokenised once into a token store (`alignkit.data.store`) and every
later run with the same data, tokenizer, template and settings memory-maps that store instead.

The cache key covers what changes the tokens: the files' paths, sizes and modification times, the row format,
the tokenizer's vocabulary and rules, the chat template, max_length, the eos token, on_bad_row and the kind of
rows (SFT rows or DPO pairs). The number of worker processes is not part of it: it does not change the result.
"""

from __future__ import annotations

import hashlib
import json

from alignkit.data.engine import Job, auto_processes, build_store, encode_rows, new_stats
from alignkit.data.sources import file_fingerprint, read_rows
from alignkit.data.store import StoredRows, TokenStore
from alignkit.data.tokenize import check_prompt_lengths
from alignkit.models.embedded import cache_root

CACHE_VERSION = "2"  # bump when tokenisation rules change, so old caches are not reused


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(vocab.encode()).hexdigest()


def cache_key(paths: list[str], job: Job) -> str:
    parts = [CACHE_VERSION, job.kind, file_fingerprint(paths), job.data_format, tokenizer_fingerprint(job.tokenizer),
             job.template, str(job.max_length), str(job.tokenizer.eos_token), job.on_bad_row]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:24]


def load_stored(paths: list[str], job: Job, num_proc: int | None = None) -> tuple[StoredRows, object, bool]:
    """(the rows, the statistics of their tokenisation, whether they came from the cache)."""
    folder = cache_root() / "tokenized" / cache_key(paths, job)
    store = TokenStore.open(folder)
    cached = store is not None
    if store is not None:
        stats = new_stats(job.kind)
        for name, value in store.stats.items():
            setattr(stats, name, value)
    else:
        store, stats = build_store(paths, job, folder, auto_processes(paths, num_proc))
    check_prompt_lengths(stats, job.max_length, job.on_bad_row)
    return StoredRows.of(store), stats, cached


def load_sft_rows(paths: list[str], data_format: str, tokenizer, template: str, max_length: int,
                  use_cache: bool = True, on_bad_row: str = "error", num_proc: int | None = None):
    """SFT rows of `paths` (stored rows, or with use_cache=False a list), their statistics, whether cached."""
    job = Job("sft", tokenizer, template, max_length, data_format, on_bad_row)
    if use_cache:
        return load_stored(paths, job, num_proc)
    rows, stats = encode_rows(job, read_rows(paths))
    check_prompt_lengths(stats, max_length, on_bad_row)
    return rows, stats, False


def load_pair_rows(paths: list[str], tokenizer, template: str, max_length: int, on_bad_row: str = "error",
                   num_proc: int | None = None):
    """DPO pairs of `paths` as stored rows, their statistics, and whether they came from the cache."""
    return load_stored(paths, Job("dpo", tokenizer, template, max_length, "auto", on_bad_row), num_proc)
