"""Build the tokenised SFT dataset from files, reusing a cached copy when data and tokenizer are unchanged."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from alignkit.data.formats import to_example
from alignkit.data.sources import file_fingerprint, read_rows
from alignkit.data.tokenize import (
    TokenizedRow,
    TokenizeStats,
    check_prompt_lengths,
    convert_rows,
    tokenize_examples,
)
from alignkit.models.embedded import cache_root

CACHE_VERSION = "1"  # bump when tokenisation rules change, so old caches are not reused


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(vocab.encode()).hexdigest()


def cache_key(paths: list[str], data_format: str, tokenizer, template: str, max_length: int,
              on_bad_row: str = "error") -> str:
    parts = [CACHE_VERSION, file_fingerprint(paths), data_format, tokenizer_fingerprint(tokenizer), template,
             str(max_length), str(tokenizer.eos_token), on_bad_row]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:24]


def load_sft_rows(paths: list[str], data_format: str, tokenizer, template: str, max_length: int,
                  use_cache: bool = True, on_bad_row: str = "error") -> tuple[list[TokenizedRow], TokenizeStats, bool]:
    """Tokenised rows, their statistics, and whether they came from the cache."""
    key = cache_key(paths, data_format, tokenizer, template, max_length, on_bad_row)
    cache_file = cache_root() / "tokenized" / key
    if use_cache and cache_file.with_suffix(".json").is_file():
        rows, stats = _load_cache(cache_file)
        return rows, stats, True
    skipped = TokenizeStats()
    examples = convert_rows(read_rows(paths), lambda row: to_example(row, data_format), on_bad_row, skipped)
    rows, stats = tokenize_examples(tokenizer, template, examples, max_length)
    stats.skipped, stats.skipped_rows = skipped.skipped, skipped.skipped_rows
    check_prompt_lengths(stats, max_length, on_bad_row)
    if use_cache:
        _save_cache(cache_file, rows, stats)
    return rows, stats, False


def _save_cache(base: Path, rows: list[TokenizedRow], stats: TokenizeStats) -> None:
    base.parent.mkdir(parents=True, exist_ok=True)
    lengths = torch.tensor([len(r.input_ids) for r in rows], dtype=torch.int64)
    tensors = {
        "input_ids": torch.tensor([t for r in rows for t in r.input_ids], dtype=torch.int64),
        "labels": torch.tensor([t for r in rows for t in r.labels], dtype=torch.int64),
        "lengths": lengths,
    }
    meta = {"stats": asdict(stats), "origins": [r.origin for r in rows]}
    # Write both files under temporary names, then rename: a crash never leaves a half cache behind.
    for suffix, write in ((".safetensors", lambda p: save_file(tensors, p)),
                          (".json", lambda p: Path(p).write_text(json.dumps(meta)))):
        fd, tmp = tempfile.mkstemp(dir=base.parent, suffix=suffix)
        os.close(fd)
        write(tmp)
        os.replace(tmp, base.with_suffix(suffix))


def _load_cache(base: Path) -> tuple[list[TokenizedRow], TokenizeStats]:
    tensors = load_file(base.with_suffix(".safetensors"))
    meta = json.loads(base.with_suffix(".json").read_text())
    lengths = tensors["lengths"].tolist()
    ids = tensors["input_ids"].split(lengths)
    labels = tensors["labels"].split(lengths)
    rows = [TokenizedRow(i.tolist(), lab.tolist(), origin)
            for i, lab, origin in zip(ids, labels, meta["origins"], strict=True)]
    return rows, TokenizeStats(**meta["stats"])
