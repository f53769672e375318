"""Data files → a token store (`alignkit.data.store`): rows streamed from the files in chunks, each chunk
converted, rendered and tokenised in one of `num_proc` worker processes, the results written in file order.

The store is the same whatever `num_proc` is: chunks are written in the order they were read, and statistics
merged in that order. Under `on_bad_row: error` the first bad row in file order stops the build, since every
chunk before it has been written without error before its chunk's result is looked at. Ctrl-C stops the
workers and leaves no store behind (`StoreWriter` builds in a temporary folder).
"""

from __future__ import annotations

import ctypes
import dataclasses
import multiprocessing
import os
import signal
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from alignkit.data.formats import to_example
from alignkit.data.sources import iter_rows
from alignkit.data.store import StoreWriter, TokenStore
from alignkit.data.tokenize import KEEP, PLAIN, Rendering, count_encoded, count_repairs, encode_examples, keep_example
from alignkit.errors import RunError, UserError

CHUNK_ROWS = 256
# Inputs smaller than this are tokenised in this process: starting worker processes (each imports the
# tokenizer library and unpickles the tokenizer) costs more than they save.
PARALLEL_BYTES = 4 << 20


@dataclass
class Job:
    """What a worker needs to turn rows into sequences; sent to each worker once."""

    kind: str  # "sft" (one sequence per row), "dpo" (chosen and rejected) or "kto" (a sequence and a label)
    tokenizer: Any
    template: str
    max_length: int
    data_format: str = "auto"
    on_bad_row: str = "error"
    rendering: Rendering = PLAIN


@dataclass
class Chunk:
    """A chunk's rows as (sequences, origin), its statistics, and the first error that stopped it."""

    rows: list = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    error: str | None = None


def new_stats(kind: str):
    from alignkit.data.feedback import FeedbackStats
    from alignkit.data.prefs import PreferenceStats
    from alignkit.data.tokenize import TokenizeStats

    return {"sft": TokenizeStats, "kto": FeedbackStats}.get(kind, PreferenceStats)()


def merge_into(total, part: dict) -> None:
    """Add one chunk's statistics (a dict of counts and lists of examples) to `total`, in order."""
    for name, value in part.items():
        current = getattr(total, name)
        setattr(total, name, (current + value)[:KEEP] if isinstance(value, list) else current + value)


def encode_chunk(job: Job, rows: list) -> Chunk:
    return {"sft": _encode_sft, "kto": _encode_feedback}.get(job.kind, _encode_pairs)(job, rows)


def _fail(chunk: Chunk, stats, err: UserError, on_bad_row: str) -> bool:
    """Count a bad row under skip; under error, record it as the chunk's error. True when the chunk stops."""
    if on_bad_row != "skip":
        chunk.error = str(err)
        return True
    stats.skipped += 1
    keep_example(stats.skipped_rows, str(err))
    return False


def _encode_sft(job: Job, rows: list) -> Chunk:
    chunk, stats, items = Chunk(), new_stats("sft"), []
    for row in rows:
        try:
            items.append(to_example(row, job.data_format))
        except UserError as err:
            items.append(err)
    examples = [item for item in items if not isinstance(item, UserError)]
    encoded = iter(_each(examples, lambda some: encode_examples(job.tokenizer, job.template, some, job.max_length,
                                                                rendering=job.rendering)))
    for item in items:
        parts = item if isinstance(item, UserError) else next(encoded)
        if isinstance(parts, UserError):
            if _fail(chunk, stats, parts, job.on_bad_row):
                break
            continue
        count_repairs(stats, item)
        for sequence in parts:
            count_encoded(stats, item.origin, sequence)
            if sequence is not None:
                chunk.rows.append(([_compact(sequence)], item.origin))
    chunk.stats = dataclasses.asdict(stats)
    return chunk


def _each(examples: list, encode) -> list:
    """encode(examples); when one of them fails, each alone, so that the bad one is named by its origin and
    skipped or reported in file order, and the others are kept."""
    try:
        return encode(examples)
    except UserError:
        results = []
        for example in examples:
            try:
                results.append(encode([example])[0])
            except UserError as err:
                text = str(err)
                results.append(err if text.startswith(example.origin) else UserError(f"{example.origin}: {text}"))
        return results


def _encode_pairs(job: Job, rows: list) -> Chunk:
    from alignkit.data.prefs import as_example, to_preference

    chunk, stats, items = Chunk(), new_stats("dpo"), []
    for row in rows:
        try:
            items.append(to_preference(row))
        except UserError as err:
            items.append(err)
    pairs = [item for item in items if item is not None and not isinstance(item, UserError)]

    def encode(some: list) -> list:
        sides = [encode_examples(job.tokenizer, job.template,
                                 [as_example(p.origin, p.prompt, getattr(p, side), p.tools) for p in some],
                                 job.max_length, split=False, rendering=job.rendering)
                 for side in ("chosen", "rejected")]
        return [(c, r) for (c,), (r,) in zip(*sides, strict=True)]

    encoded = iter(_each(pairs, encode))
    for item in items:
        if item is None:
            stats.identical += 1
            continue
        both = item if isinstance(item, UserError) else next(encoded)
        if isinstance(both, UserError):
            if _fail(chunk, stats, both, job.on_bad_row):
                break
            continue
        c, r = both
        if c is None or r is None:
            stats.dropped += 1
            keep_example(stats.dropped_origins, item.origin)
            continue
        stats.pairs += 1
        stats.truncated += c.truncated or r.truncated
        chunk.rows.append(([_compact(c), _compact(r)], item.origin))
    chunk.stats = dataclasses.asdict(stats)
    return chunk


def _encode_feedback(job: Job, rows: list) -> Chunk:
    """Rows as ([sequence], origin, label)."""
    from alignkit.data.feedback import to_feedback
    from alignkit.data.prefs import as_example

    chunk, stats, items = Chunk(), new_stats("kto"), []
    for row in rows:
        try:
            items.append(to_feedback(row))
        except UserError as err:
            items.append(err)
    examples = [item for item in items if not isinstance(item, UserError)]
    encoded = iter(_each(examples, lambda some: [s for (s,) in encode_examples(
        job.tokenizer, job.template, [as_example(e.origin, e.prompt, e.completion, e.tools) for e in some],
        job.max_length, split=False, rendering=job.rendering)]))
    for item in items:
        sequence = item if isinstance(item, UserError) else next(encoded)
        if isinstance(sequence, UserError):
            if _fail(chunk, stats, sequence, job.on_bad_row):
                break
            continue
        if sequence is None:
            stats.dropped += 1
            keep_example(stats.dropped_origins, item.origin)
            continue
        stats.rows += 1
        stats.desirable += item.label
        stats.undesirable += not item.label
        stats.truncated += sequence.truncated
        chunk.rows.append(([_compact(sequence)], item.origin, item.label))
    chunk.stats = dataclasses.asdict(stats)
    return chunk


def _compact(sequence) -> tuple[np.ndarray, np.ndarray]:
    """(ids, trained) in the smallest types that cross a process boundary without loss."""
    return sequence.ids.astype(np.uint32), sequence.trained


def _chunks(paths: list[str]) -> Iterator[list | UserError]:
    """The rows in chunks; a file that cannot be read further ends the stream with its error, after the rows
    read before it."""
    batch: list = []
    try:
        for row in iter_rows(paths):
            batch.append(row)
            if len(batch) == CHUNK_ROWS:
                yield batch
                batch = []
    except UserError as err:
        if batch:
            yield batch
        yield err
        return
    if batch:
        yield batch


def input_bytes(paths: list[str]) -> int:
    return sum(sum(f.stat().st_size for f in Path(p).rglob("*") if f.is_file()) if Path(p).is_dir()
               else Path(p).stat().st_size for p in paths)


def auto_processes(paths: list[str], num_proc: int | None) -> int:
    """num_proc as given, or (None) the CPUs this process may use, one for inputs under PARALLEL_BYTES."""
    if num_proc is not None:
        return max(1, num_proc)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return cpus if input_bytes(paths) >= PARALLEL_BYTES else 1


def build_store(paths: list[str], job: Job, folder: Path, num_proc: int) -> tuple[TokenStore, Any]:
    """Tokenise `paths` into a new store at `folder`; returns it and the statistics of the build."""
    from tqdm.auto import tqdm

    writer = StoreWriter(folder, 2 if job.kind == "dpo" else 1, len(job.tokenizer), row_labels=job.kind == "kto")
    stats = new_stats(job.kind)
    results = _in_process(paths, job) if num_proc <= 1 else _in_workers(paths, job, num_proc)
    progress = tqdm(desc=f"tokenising ({num_proc} processes)", unit=" rows", dynamic_ncols=True,
                    disable=input_bytes(paths) < PARALLEL_BYTES or os.environ.get("RANK", "0") != "0")
    try:
        for chunk in results:
            with _writing(folder):
                for sequences, origin, *label in chunk.rows:
                    writer.add(sequences, origin, *label)
            merge_into(stats, chunk.stats)
            progress.update(CHUNK_ROWS)
            if chunk.error:
                raise UserError(chunk.error)
        with _writing(folder):
            store = writer.publish(dataclasses.asdict(stats))
    except BaseException:
        writer.discard()
        raise
    finally:
        results.close()
        progress.close()
    _return_freed_memory()
    return store, stats


@contextmanager
def _writing(folder: Path):
    """A failed write into the store being built (a full disk) as one line; the caller discards the store."""
    try:
        yield
    except OSError as err:
        raise RunError(f"could not write the tokenised-data cache {folder} ({err.strerror or err}); nothing "
                       "half-written was kept: free some space (or point ALIGNKIT_CACHE elsewhere) and run again"
                       ) from None


def _return_freed_memory() -> None:
    """Hand the heap that tokenisation freed back to the system (glibc keeps it otherwise, for the whole run)."""
    with suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _in_process(paths: list[str], job: Job) -> Iterator[Chunk]:
    for item in _chunks(paths):
        yield Chunk(error=str(item)) if isinstance(item, UserError) else encode_chunk(job, item)


_JOB: Job | None = None


def _start_worker(job: Job) -> None:
    global _JOB
    _JOB = job
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops the pool
    # one thread each: the tokenizer's own thread pool in every worker would oversubscribe the CPUs
    os.environ.update(TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")


def _encode_in_worker(rows: list) -> Chunk:
    assert _JOB is not None
    return encode_chunk(_JOB, rows)


def _in_workers(paths: list[str], job: Job, num_proc: int) -> Iterator[Chunk]:
    """Chunks encoded by a pool, yielded in reading order; at most 2 chunks per worker are in flight, so the
    reader never runs ahead of tokenisation by more than that. A build that stops early (a bad row, Ctrl-C)
    waits for the chunks the workers are encoding, one each."""
    pool = ProcessPoolExecutor(num_proc, mp_context=_context(), initializer=_start_worker, initargs=(job,))
    try:
        pending: deque = deque()
        for item in _chunks(paths):
            pending.append(Chunk(error=str(item)) if isinstance(item, UserError)
                           else pool.submit(_encode_in_worker, item))
            while len(pending) > 2 * num_proc:
                yield _result(pending.popleft())
        while pending:
            yield _result(pending.popleft())
    except BrokenProcessPool:  # raised by the chunk of the worker that died, or by the next submit
        raise RunError(f"a tokenising worker process died (out of memory?) while {num_proc} were running; run "
                       f"again with fewer (--num-proc {max(1, num_proc // 2)}): the rows tokenised so far are "
                       "not kept") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _context():
    """fork where there is one: workers start at once and a user's script needs no `if __name__ == "__main__"`
    guard. Workers only parse, render and tokenise (no torch), so threads the parent started do not matter."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def _result(item) -> Chunk:
    """A chunk's result; a worker that died (the kernel's out-of-memory killer, a signal) raises
    BrokenProcessPool here rather than leaving the build waiting for its chunk forever."""
    return item if isinstance(item, Chunk) else item.result()


def encode_rows(job: Job, rows: list) -> tuple[list, Any]:
    """Rows tokenised in this process as Python lists (for small sets: evaluation data, tests)."""
    from alignkit.data.prefs import PreferenceRow
    from alignkit.data.tokenize import TokenizedRow, labels_of

    def row_of(sequence: tuple[np.ndarray, np.ndarray], origin: str) -> TokenizedRow:
        ids, trained = sequence[0].astype(np.int64), sequence[1]
        return TokenizedRow(ids.tolist(), labels_of(ids, trained), origin)

    chunk = encode_chunk(job, rows)
    if chunk.error:
        raise UserError(chunk.error)
    stats = new_stats(job.kind)
    merge_into(stats, chunk.stats)
    if job.kind == "sft":
        return [row_of(sequences[0], origin) for sequences, origin in chunk.rows], stats
    if job.kind == "kto":
        from alignkit.data.feedback import FeedbackRow

        return [FeedbackRow(row_of(sequences[0], origin), label, origin, i)
                for i, (sequences, origin, label) in enumerate(chunk.rows)], stats
    return [PreferenceRow(row_of(c, origin), row_of(r, origin), origin) for (c, r), origin in chunk.rows], stats
