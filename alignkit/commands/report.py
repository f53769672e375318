"""`alignkit report RUN_DIR`: report.md and PNG plots from a run's metrics.jsonl and summary.json."""

from __future__ import annotations

import json
from pathlib import Path

from alignkit import plots
from alignkit.errors import UserError

CURVES = [  # (file, title, keys): a plot is drawn when the run logged any of its keys
    ("loss.png", "Loss", ["loss", "eval/loss"]),
    ("lr.png", "Learning rate", ["lr"]),
    ("grad_norm.png", "Gradient norm (before clipping)", ["grad_norm"]),
    ("rewards.png", "DPO implicit rewards", ["rewards/chosen", "rewards/rejected", "eval/rewards/chosen",
                                            "eval/rewards/rejected"]),
    ("margins.png", "DPO reward margins", ["rewards/margins", "eval/rewards/margins"]),
    ("accuracies.png", "DPO reward accuracies", ["rewards/accuracies", "eval/rewards/accuracies"]),
    ("throughput.png", "Tokens per second", ["tokens_per_s"]),
]


def run(cfg) -> Path:
    if not cfg.run:
        raise UserError("usage: alignkit report RUN_DIR")
    folder = Path(cfg.run)
    rows = plots.read_metrics(folder)
    if not rows:
        raise UserError(f"{folder}: no metrics.jsonl with rows")
    figures = folder / "plots"
    figures.mkdir(exist_ok=True)
    made = []
    for name, title, keys in CURVES:
        curves = {key: plots.series(rows, key) for key in keys if plots.series(rows, key)[0]}
        if curves:
            made.append(plots.lines(figures / name, title, title.split(" (")[0], curves))
    summary_path = folder / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    table = "\n".join(f"| {k} | {v} |" for k, v in summary.items() if not isinstance(v, (dict, list)))
    text = f"# Run report: {folder.name}\n\n| summary | value |\n|---|---|\n{table}\n\n"
    text += "\n".join(f"![{p.stem}]({p.relative_to(folder)})" for p in made) + "\n"
    report = folder / "report.md"
    report.write_text(text, encoding="utf-8")
    print(f"report: {report}")
    return report
