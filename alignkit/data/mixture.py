"""Data mixtures: a run's data as a list of sources, each contributing all its rows, a count, a fraction or a
weighted share of a total (the data-composition study of Dong et al. 2023, arXiv 2310.05492, mixes math, code
and general data by amount and ratio this way).

A source is written in YAML as a path or a mapping, and on the command line as `PATH` or `PATH@KEY=VALUE,...`:

    data:
      - general.jsonl                          # every row
      - {path: math.jsonl, count: 500}         # 500 rows drawn without replacement
      - {path: code.jsonl, fraction: 0.25}     # a quarter of its rows
      - {path: chat.jsonl, weight: 2}          # weighted sources share `mix_total` rows in proportion
    mix_total: 3000

`replace: true` lets a source give more rows than it holds: it is repeated whole as often as fits and the rest
is drawn without replacement (upsampling). Every draw is seeded by (seed, path, how many earlier sources name the
same path), so a source's rows do not change when another source is added, removed, moved or resized.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignkit.data.store import join, take
from alignkit.errors import UserError

AMOUNTS = ("count", "fraction", "weight")
KEYS = ("path", *AMOUNTS, "replace")


@dataclass(frozen=True)
class Source:
    path: str
    count: int | None = None
    fraction: float | None = None
    weight: float | None = None
    replace: bool = False

    def describe(self) -> str:
        amount = next((f"{k} {getattr(self, k)}" for k in AMOUNTS if getattr(self, k) is not None), "all rows")
        return amount + (", with replacement" if self.replace else "")


# ---------------------------------------------------------------- config entries

def normalise_entries(value: Any, where: str, name: str = "data") -> list[str | dict]:
    """Config entries as stored: a plain path stays a string, a source with an amount becomes a mapping."""
    items = value if isinstance(value, (list, tuple)) else [value]
    return [_normalise_entry(item, f"{where}: {name}[{i}]") for i, item in enumerate(items)]


def _normalise_entry(item: Any, where: str) -> str | dict:
    if isinstance(item, Path):
        item = str(item)
    if isinstance(item, str):
        path, _, spec = item.rpartition("@")
        if not path or "=" not in spec:  # no amount: a plain path (which may hold an @ of its own)
            return item
        item = {"path": path, **_parse_spec(spec, where)}
    if not isinstance(item, dict):
        raise UserError(f"{where}: a data source is a path or a mapping with 'path', got {item!r}")
    unknown = [k for k in item if k not in KEYS]
    if unknown:
        raise UserError(f"{where}: unknown key '{unknown[0]}' (a source takes {', '.join(KEYS)})")
    if not isinstance(item.get("path"), str) or not item["path"]:
        raise UserError(f"{where}: 'path' is required (the data file or folder)")
    source = _check_source(item, where)
    return {k: v for k, v in vars(source).items() if v is not None and not (k == "replace" and v is False)}


def _parse_spec(spec: str, where: str) -> dict:
    values: dict[str, Any] = {}
    for part in filter(None, spec.split(",")):
        key, sep, text = part.partition("=")
        if not sep:
            raise UserError(f"{where}: '{part}' should be KEY=VALUE (e.g. math.jsonl@count=500)")
        values[key.strip()] = text.strip()
    return values


def _check_source(item: dict, where: str) -> Source:
    given = [k for k in AMOUNTS if item.get(k) is not None]
    if len(given) > 1:
        raise UserError(f"{where}: give one of count, fraction or weight, not {' and '.join(given)}")
    replace = _as_bool(item.get("replace", False), f"{where}: 'replace'")
    values: dict[str, Any] = {}
    if "count" in given:
        values["count"] = _as_number(item["count"], int, f"{where}: 'count'")
        if values["count"] < 0:
            raise UserError(f"{where}: 'count' must be >= 0, got {values['count']}")
    if "fraction" in given:
        values["fraction"] = _as_number(item["fraction"], float, f"{where}: 'fraction'")
        if values["fraction"] < 0 or (values["fraction"] > 1 and not replace):
            raise UserError(f"{where}: 'fraction' must be in [0, 1] (above 1 needs replace: true), "
                            f"got {values['fraction']}")
    if "weight" in given:
        values["weight"] = _as_number(item["weight"], float, f"{where}: 'weight'")
        if values["weight"] <= 0:
            raise UserError(f"{where}: 'weight' must be > 0, got {values['weight']}")
    return Source(path=item["path"], replace=replace, **values)


def _as_number(value: Any, kind: type, where: str) -> Any:
    if isinstance(value, bool):
        raise UserError(f"{where} must be a number, got {value!r}")
    try:
        number = _fraction_text(value) if isinstance(value, str) else float(value)
    except (TypeError, ValueError, ZeroDivisionError):
        raise UserError(f"{where} must be a number, got {value!r}") from None
    if not math.isfinite(number) or (kind is int and not number.is_integer()):
        raise UserError(f"{where} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    return kind(number)


def _fraction_text(text: str) -> float:
    """'0.25' or '1/256': DMT's k is usually written as a fraction."""
    match = re.fullmatch(r"\s*([0-9.eE+-]+)\s*/\s*([0-9.eE+-]+)\s*", text)
    return float(match[1]) / float(match[2]) if match else float(text)


def _as_bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
        return value.lower() in ("true", "yes")
    raise UserError(f"{where} must be true or false, got {value!r}")


def sources_of(entries: list[str | dict]) -> list[Source]:
    return [Source(path=e) if isinstance(e, str) else Source(**e) for e in entries]


def source_paths(entries: list[str | dict]) -> list[str]:
    return [source.path for source in sources_of(entries)]


# ---------------------------------------------------------------- drawing rows

def planned_counts(sources: list[Source], available: list[int], total: int) -> list[int]:
    """Rows each source contributes. Weighted sources split `total` by largest remainders, so they sum to it."""
    counts: list[int] = []
    weighted = [i for i, s in enumerate(sources) if s.weight is not None]
    if weighted and total <= 0:
        raise UserError("a source has a 'weight': set 'mix_total', the rows the weighted sources share")
    shares = _largest_remainder([sources[i].weight for i in weighted], total) if weighted else []
    share_of = dict(zip(weighted, shares, strict=True))
    for i, (source, n) in enumerate(zip(sources, available, strict=True)):
        if source.count is not None:
            want = source.count
        elif source.fraction is not None:
            want = math.floor(source.fraction * n + 0.5)
        elif source.weight is not None:
            want = share_of[i]
        else:
            want = n
        if want > n and not source.replace:
            raise UserError(f"data[{i}] ({source.path}): {source.describe()} asks for {want} rows but it has {n} "
                            "usable rows (add replace: true to repeat rows)")
        if want > 0 and n == 0:
            raise UserError(f"data[{i}] ({source.path}): has no usable rows to draw {want} from")
        counts.append(want)
    return counts


def _largest_remainder(weights: list[float], total: int) -> list[int]:
    exact = [total * w / sum(weights) for w in weights]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def draw(rows: Sequence, want: int, rng: random.Random) -> Sequence:
    """`want` rows: whole copies while they fit, then a sample without replacement, kept in file order."""
    copies, rest = divmod(want, len(rows)) if rows else (0, 0)
    picked = sorted(rng.sample(range(len(rows)), rest))
    return take(rows, [*range(len(rows))] * copies + picked)


def mix(row_lists: list[Sequence], sources: list[Source], total: int, seed: int) -> tuple[Sequence, list[Sequence]]:
    """All drawn rows (source by source) and each source's drawn rows."""
    counts = planned_counts(sources, [len(rows) for rows in row_lists], total)
    drawn = [draw(rows, want, random.Random(f"{seed}/{source.path}/{_repeat(sources, i)}"))
             for i, (rows, want, source) in enumerate(zip(row_lists, counts, sources, strict=True))]
    return join(drawn), drawn


def _repeat(sources: list[Source], i: int) -> int:
    """How many sources before the i-th name the same path (a file may be listed twice on purpose)."""
    return sum(1 for s in sources[:i] if s.path == sources[i].path)


def check_amounts(entries: list[str | dict], total: int) -> None:
    """What can be known before any row is read: weights need a total, a total needs weights."""
    weighted = any(s.weight is not None for s in sources_of(entries))
    if weighted and total <= 0:
        raise UserError("a data source has a 'weight': set 'mix_total', the rows the weighted sources share")
    if total > 0 and not weighted:
        raise UserError("'mix_total' is shared by sources with a 'weight', and no source has one")


def log_mixture(sources: list[dict], unit: str) -> None:
    """One log line, when the mixture is more than every row of one source."""
    from alignkit.log import log

    if len(sources) > 1 or sources[0]["used"] != sources[0]["available"]:
        log("data mixture: " + "; ".join(f"{s['path']} {s['used']}/{s['available']} {unit} ({s['amount']})"
                                         for s in sources))


def load_mixture(entries: list[str | dict], total: int, seed: int, load_source, count_tokens
                 ) -> tuple[list, list, list]:
    """(drawn rows, each source's load statistics, a summary row per source).

    `load_source(path)` gives (rows, stats) for one source; `count_tokens(rows)` the trained tokens in rows."""
    sources = sources_of(entries)
    loaded = [load_source(source.path) for source in sources]
    rows, drawn = mix([rows for rows, _ in loaded], sources, total, seed)
    summary = [{"path": source.path, "amount": source.describe(), "available": len(available), "used": len(used),
                "trained_tokens": count_tokens(used)}
               for source, (available, _), used in zip(sources, loaded, drawn, strict=True)]
    return rows, [stats for _, stats in loaded], summary
