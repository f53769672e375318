"""Small PNG plots for reports (matplotlib, no display needed)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    picked = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None]
    return [s for s, _ in picked], [v for _, v in picked]


def lines(path: Path, title: str, ylabel: str, curves: dict[str, tuple[list, list]], xlabel: str = "step") -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for label, (xs, ys) in curves.items():
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=label)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def histograms(path: Path, title: str, xlabel: str, samples: dict[str, list[float]], bins: int = 20) -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.6))
    low = min(min(v) for v in samples.values() if v)
    high = max(max(v) for v in samples.values() if v)
    for label, values in samples.items():
        ax.hist(values, bins=bins, range=(low, high), alpha=0.5, label=label)
    ax.set(title=title, xlabel=xlabel, ylabel="samples")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def points(path: Path, title: str, xlabel: str, ylabel: str, labelled: list[tuple[str, float, float]],
           connect: bool = False) -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.6))
    xs, ys = [x for _, x, _ in labelled], [y for _, _, y in labelled]
    if connect and len(labelled) > 1:
        order = sorted(range(len(xs)), key=lambda i: xs[i])
        ax.plot([xs[i] for i in order], [ys[i] for i in order], color="grey", alpha=0.5)
    ax.scatter(xs, ys, zorder=3)
    ax.margins(x=0.15, y=0.15)  # room for the labels
    for label, x, y in labelled:
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 5))
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
