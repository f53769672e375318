"""A fuzzer for the row readers and converters: every data file is either training rows or one error line.

    python -m tests.fuzz_rows [--cases 2000] [--seed 0]

Each case writes a data file (JSONL, JSON, CSV or Parquet; SFT rows of every format or preference pairs), damages
it (random byte flips, cuts, invalid UTF-8, byte-order marks, values of the wrong type, huge and deeply nested
values) and tokenises it as training would, under on_bad_row error and skip. The outcome must be rows or a
UserError whose message is one line; any other exception, or a case running longer than its time limit, is a
failure. tests/test_fuzz_rows.py runs a fixed number of seeded cases in CI.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import tempfile
from pathlib import Path

GOOD_ROWS = [
    {"prompt": "Hello", "completion": "world"},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 2 and 3."},
                  {"role": "assistant", "content": "5"}]},
    {"conversations": [{"from": "gpt", "value": "Hi!"}, {"from": "human", "value": "Hi"},
                       {"from": "gpt", "value": "Hello there"}]},
    {"instruction": "Say hi", "input": "", "output": "hi"},
    {"text": "The answer is 42."},
    {"prompt": [{"role": "user", "content": "Q"}], "completion": [{"role": "assistant", "content": "A"}]},
]
GOOD_PAIRS = [
    {"prompt": "Add 2 and 3.", "chosen": "5", "rejected": "6"},
    {"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
     "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away"}]},
]
ODD_VALUES = [None, 0, -1, 1.5e308, float("nan"), True, "", " ", "x" * 200_000, [], {}, [[[]]], {"a": {"b": {}}},
              ["user"], {"role": "user"}, "\x00", "\ud800".encode("utf-8", "surrogatepass").decode("latin-1"),
              "\u2028", "😀" * 1000]
NESTING = 100_000


def mutate_value(rng: random.Random, value):
    """The row with one value somewhere inside replaced by an odd one (or nested very deeply)."""
    if isinstance(value, dict) and value and rng.random() < 0.8:
        key = rng.choice(list(value))
        return {**value, key: mutate_value(rng, value[key])}
    if isinstance(value, list) and value and rng.random() < 0.8:
        i = rng.randrange(len(value))
        return value[:i] + [mutate_value(rng, value[i])] + value[i + 1:]
    return rng.choice(ODD_VALUES)


def rows_for(rng: random.Random, pairs: bool) -> list:
    rows = [json.loads(json.dumps(rng.choice(GOOD_PAIRS if pairs else GOOD_ROWS))) for _ in range(rng.randint(1, 6))]
    for _ in range(rng.randint(0, 2)):
        i = rng.randrange(len(rows))
        rows[i] = mutate_value(rng, rows[i])
    return rows


def serialise(rng: random.Random, rows: list, suffix: str, path: Path) -> None:
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            pq.write_table(pa.Table.from_pylist([{"text": json.dumps(r)} if rng.random() < 0.3 else r for r in rows
                                                 if isinstance(r, dict)]), path)
        except (pa.ArrowException, TypeError, ValueError, OverflowError):
            path.write_bytes(b"PAR1" + bytes(rng.randrange(256) for _ in range(64)))
        return
    if suffix == ".csv":
        import csv
        import io

        text = io.StringIO()
        keys = sorted({k for r in rows if isinstance(r, dict) for k in r}) or ["text"]
        writer = csv.writer(text)
        writer.writerow(keys)
        for r in rows:
            writer.writerow([r.get(k, "") if isinstance(r, dict) else r for k in keys])
        data = text.getvalue().encode("utf-8", "surrogatepass")
    else:
        dumps = [json.dumps(r, ensure_ascii=rng.random() < 0.5) for r in rows]
        if rng.random() < 0.05:
            dumps[0] = "[" * NESTING + "]" * NESTING
        text = ("[" + ",\n".join(dumps) + "]") if suffix == ".json" else "".join(d + "\n" for d in dumps)
        data = text.encode("utf-8", "surrogatepass")
    path.write_bytes(damage(rng, data))


def damage(rng: random.Random, data: bytes) -> bytes:
    data = bytearray(data)
    for _ in range(rng.choice([0, 0, 1, 2, 5])):
        kind = rng.random()
        at = rng.randrange(len(data) + 1)
        if kind < 0.4 and data:
            data[min(at, len(data) - 1)] ^= 1 << rng.randrange(8)
        elif kind < 0.55:
            del data[at:]
        elif kind < 0.7:
            data[at:at] = rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00", b"\r", b"\xe2\x80\xa8"])
        elif kind < 0.8:
            data[0:0] = b"\xef\xbb\xbf"
        else:
            data[at:at] = rng.choice([b"\n", b"{", b"}", b'"', b",", b"\n\n", b"]"])
    return bytes(data)


class TimedOut(Exception):
    pass


def run_case(seed: int, folder: Path, tokenizer, template: str, seconds: int = 20) -> str:
    """'rows', 'error' or what went wrong; raises AssertionError on a failure."""
    from alignkit.data.cache import load_pair_rows, load_sft_rows
    from alignkit.errors import UserError

    rng = random.Random(seed)
    pairs = rng.random() < 0.3
    suffix = rng.choice([".jsonl", ".json", ".csv", ".parquet"])
    path = folder / f"case-{seed}{suffix}"
    serialise(rng, rows_for(rng, pairs), suffix, path)
    on_bad_row = rng.choice(["error", "skip"])

    def alarm(*_):
        raise TimedOut

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        if pairs:
            load_pair_rows([str(path)], tokenizer, template, 64, on_bad_row, num_proc=1)
        else:
            load_sft_rows([str(path)], "auto", tokenizer, template, 64, on_bad_row=on_bad_row, num_proc=1)
        return "rows"
    except UserError as err:
        assert "\n" not in str(err), f"seed {seed}: an error of several lines: {err!r}"
        return "error"
    except TimedOut:
        raise AssertionError(f"seed {seed}: {path.name} took over {seconds} s") from None
    except Exception as err:
        raise AssertionError(f"seed {seed}: {path.name} ({on_bad_row}) raised {type(err).__name__}: {err}") from err
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import os

    from tests.conftest import CHATML, build_tokenizer

    tokenizer = build_tokenizer()
    outcomes: dict[str, int] = {}
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["ALIGNKIT_CACHE"] = str(Path(tmp) / "cache")
        for seed in range(args.seed, args.seed + args.cases):
            try:
                outcome = run_case(seed, Path(tmp), tokenizer, CHATML)
            except AssertionError as err:
                failures.append(str(err))
                outcome = "failure"
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
    print(f"{args.cases} cases from seed {args.seed}: " + ", ".join(f"{n} {k}" for k, n in sorted(outcomes.items())))
    for failure in failures[:20]:
        print("  " + failure)
    raise SystemExit(1 if failures else 0)


if __name__ == "__main__":
    main()
