"""The two ways to keep tokenised rows on disk, on the same real rows: alignkit's flat token arrays against a
`datasets` Arrow table.

    python bench/store_formats.py [--rows 17400] [--reads 5000]

Rows: the ShareGPT conversations of bench/data_vs_trl.py (the first N; more than 17,400 repeats them), tokenised
once by alignkit's engine (SmolLM2-135M-Instruct's tokenizer and template, max_length 2048, `on_bad_row: skip`).
Both formats then store exactly those rows (token ids, the trained-token mask, the row's origin), so the
tokenisation, which both would share, is not in the figures:

- flat: `data.store.StoreWriter` (uint16 ids, one mask byte per token, int64 offsets; every file hashed on
  publish and checked on open);
- arrow: `datasets.Dataset.from_generator` with uint16 / uint8 list features, written once to its cache as Arrow
  files (what a fingerprinted `map` cache holds), opened again with `Dataset.from_file`, memory-mapped.

Reported per format: seconds to write, bytes on disk, seconds to open again, microseconds per row for random
reads by index as numpy arrays (what the training loop does one micro-batch at a time), and the growth of
anonymous memory (RssAnon) over the whole, i.e. what stays in the heap rather than in memory-mapped pages.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout's bench/ and experiments/

from bench.data_vs_trl import ALL, MAX_LENGTH, MODEL, cpu_description, rss_anon_mib, write_sizes  # noqa: E402


def tokenised_rows(rows: int, workdir: Path):
    """The StoredRows of the first `rows` conversations, tokenised into a cache under `workdir`."""
    from transformers import AutoTokenizer

    from alignkit.data.cache import load_sft_rows
    from alignkit.data.templates import resolve_template
    from alignkit.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(MODEL))  # from the user's cache
    os.environ["ALIGNKIT_CACHE"] = str(workdir / "cache")
    raw = write_sizes([rows], workdir, with_trl=False)[rows][0]
    stored = load_sft_rows([str(raw)], "sharegpt", tokenizer, resolve_template(tokenizer, None), MAX_LENGTH,
                           on_bad_row="skip")[0]
    return stored, len(tokenizer)


def sequences(stored):
    """(ids, trained, origin) of every row, read from the tokenised store."""
    for number, row in stored.index:
        store = stored.stores[int(number)]
        ids, trained = store.sequence(int(row))
        yield ids, trained, store.origin(int(row))


def flat(stored, vocab: int, folder: Path, picks: np.ndarray) -> dict:
    from alignkit.data.store import StoreWriter, TokenStore

    started = time.perf_counter()
    writer = StoreWriter(folder, 1, vocab)
    for ids, trained, origin in sequences(stored):
        writer.add([(ids, trained)], origin)
    writer.publish({})
    written = time.perf_counter() - started
    started = time.perf_counter()
    store = TokenStore.open(folder)
    opened = time.perf_counter() - started
    started = time.perf_counter()
    tokens = sum(len(store.sequence(int(k))[0]) for k in picks)
    read = time.perf_counter() - started
    return {"write_s": written, "bytes": sum(f.stat().st_size for f in folder.iterdir()), "open_s": opened,
            "read_us_per_row": 1e6 * read / len(picks), "tokens_read": tokens}


def arrow(stored, folder: Path, picks: np.ndarray) -> dict:
    import datasets

    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("uint16")),
                                  "trained": datasets.Sequence(datasets.Value("uint8")),
                                  "origin": datasets.Value("string")})

    def rows():
        for ids, trained, origin in sequences(stored):
            yield {"input_ids": ids.astype(np.uint16), "trained": trained.astype(np.uint8), "origin": origin}

    started = time.perf_counter()
    table = datasets.Dataset.from_generator(rows, features=features, cache_dir=str(folder / "hf-cache"))
    written = time.perf_counter() - started
    files = [Path(f["filename"]) for f in table.cache_files]
    started = time.perf_counter()
    table = datasets.concatenate_datasets([datasets.Dataset.from_file(str(f)) for f in files])
    table = table.with_format("numpy", columns=["input_ids", "trained"])
    opened = time.perf_counter() - started
    started = time.perf_counter()
    tokens = sum(len(table[int(k)]["input_ids"]) for k in picks)
    read = time.perf_counter() - started
    return {"write_s": written, "bytes": sum(f.stat().st_size for f in files), "open_s": opened,
            "read_us_per_row": 1e6 * read / len(picks), "tokens_read": tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=ALL, help="conversations (default: %(default)s)")
    parser.add_argument("--reads", type=int, default=5000, help="random reads by index (default: %(default)s)")
    args = parser.parse_args()
    import datasets  # noqa: F401  (imported before any measurement: its import is not a cost of the format)

    print(f"CPU: {cpu_description()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="alignkit-store-bench-") as work:
        workdir = Path(work)
        stored, vocab = tokenised_rows(args.rows, workdir)
        tokens = int(stored.lengths().sum())
        print(f"{len(stored):,} rows, {tokens:,} tokens (max_length {MAX_LENGTH})", flush=True)
        picks = np.random.default_rng(0).integers(0, len(stored), args.reads)
        results = {}
        for name, measure in (("flat arrays", lambda: flat(stored, vocab, workdir / "flat", picks)),
                              ("datasets Arrow", lambda: arrow(stored, workdir / "arrow", picks))):
            before = rss_anon_mib()
            results[name] = r = measure()
            r["held_mib"] = rss_anon_mib() - before
            assert r["tokens_read"] == results["flat arrays"]["tokens_read"]  # the same rows came back
        print(f"  {'':<16}{'write s':>9}{'MiB on disk':>13}{'open s':>8}{'µs/row read':>13}{'heap MiB':>10}")
        for name, r in results.items():
            print(f"  {name:<16}{r['write_s']:>9.2f}{r['bytes'] / 2**20:>13.1f}{r['open_s']:>8.2f}"
                  f"{r['read_us_per_row']:>13.1f}{r['held_mib']:>10.1f}")
        a, f = results["datasets Arrow"], results["flat arrays"]
        print(f"  Arrow / flat: write x{a['write_s'] / f['write_s']:.2f}, disk x{a['bytes'] / f['bytes']:.2f}, "
              f"open x{a['open_s'] / max(f['open_s'], 1e-9):.2f}, "
              f"read x{a['read_us_per_row'] / f['read_us_per_row']:.2f}")


if __name__ == "__main__":
    main()
