"""`alignkit data inspect FILE`: what training would make of a data file, shown before any training.

The file is tokenised exactly as `alignkit sft` / `alignkit dpo` would (same engine, same cache, bad rows skipped
and counted). Printed: the first --rows rows rendered with the chat template, trained text marked; then for the
whole file the row and token counts, the trained fraction (trained labels / tokens), and how many rows were
truncated (longer than max_length), dropped (the prompt alone fills max_length), repaired (see
`alignkit.data.formats`) or skipped as bad (with the first reasons). A histogram of row lengths is written as PNG.
"""

from __future__ import annotations

import sys
from pathlib import Path

from alignkit.data.cache import load_pair_rows, load_sft_rows
from alignkit.data.sources import iter_rows, require
from alignkit.data.templates import resolve_template
from alignkit.data.tokenize import Rendering
from alignkit.data.view import counts, row_view
from alignkit.errors import UserError
from alignkit.models.load import load_tokenizer, resolve_model

MARKS = {True: ("\x1b[42;30m", "\x1b[0m"), False: ("[[", "]]")}


def run(cfg) -> dict:
    if cfg.action != "inspect" or not cfg.data:
        raise UserError("usage: alignkit data inspect FILE [--model M] [--rows K]")
    require(Path(cfg.data))
    tokenizer = load_tokenizer(resolve_model(cfg.model))
    template = resolve_template(tokenizer, cfg.chat_template)
    pairs = is_preference_data(cfg.data)
    rendering = Rendering.of(cfg)
    if pairs:
        rows, stats, _ = load_pair_rows([cfg.data], tokenizer, template, cfg.max_length, "skip", cfg.num_proc,
                                        rendering)
    else:
        rows, stats, _ = load_sft_rows([cfg.data], cfg.data_format, tokenizer, template, cfg.max_length,
                                       on_bad_row="skip", num_proc=cfg.num_proc, rendering=rendering)
    colour = cfg.color == "always" or (cfg.color == "auto" and sys.stdout.isatty())
    for i in range(min(cfg.rows, len(rows))):
        show_row(rows[i], tokenizer, colour)
    summary = summarise(rows, stats, cfg.max_length)
    print_summary(summary, stats)
    if len(rows):
        summary["plot"] = str(histogram(rows, cfg))
        print(f"length histogram: {summary['plot']}")
    return summary


def is_preference_data(path: str) -> bool:
    """Told by the first row's fields."""
    rows = iter_rows([path])
    try:
        first = next(rows, None)
    finally:
        rows.close()
    if first is None:
        raise UserError(f"{path}: holds no rows")
    return "chosen" in first.fields and "rejected" in first.fields


def marked(segments: list[tuple[str, bool]], colour: bool) -> str:
    """The text with each run of trained tokens between marks."""
    opening, closing = MARKS[colour]
    return "".join(f"{opening}{text}{closing}" if trained else text for text, trained in segments)


def show_row(row, tokenizer, colour: bool) -> None:
    view = row_view(row, tokenizer)
    for side in view["sides"]:
        name = f" {side['name']}" if side["name"] else ""
        print(f"--- {view['origin']}{name}: {side['tokens']} tokens, {side['trained']} trained")
        print(marked(side["segments"], colour))
    print()


def summarise(rows, stats, max_length: int) -> dict:
    return {**counts(rows, max_length), "truncated": stats.truncated, "dropped": stats.dropped,
            "repaired": getattr(stats, "repaired", 0), "skipped": stats.skipped,
            "identical": getattr(stats, "identical", 0)}


def print_summary(summary: dict, stats) -> None:
    print(f"{summary['rows']:,} rows, {summary['tokens']:,} tokens, {summary['trained_tokens']:,} trained "
          f"({100 * summary['trained_fraction']:.1f}%), longest {summary['longest']} tokens")
    reasons = {"truncated": f"longer than max_length={summary['max_length']} (cut from the end)",
               "dropped": "the prompt alone fills max_length", "repaired": "changed by the repair rules",
               "skipped": "bad rows left out", "identical": "chosen equals rejected"}
    examples = {"truncated": getattr(stats, "truncated_origins", []), "dropped": stats.dropped_origins,
                "repaired": getattr(stats, "repaired_rows", []), "skipped": stats.skipped_rows}
    for name, why in reasons.items():
        if summary[name]:
            shown = "; ".join(examples.get(name, [])[:3])
            print(f"{summary[name]:,} {name}: {why}" + (f" (e.g. {shown})" if shown else ""))


def histogram(rows, cfg) -> Path:
    from alignkit import plots

    path = Path(cfg.plot or f"{Path(cfg.data).stem}.lengths.png")
    sizes = rows.lengths()
    labels = ["chosen", "rejected"] if sizes.shape[1] == 2 else ["rows"]
    fig, ax = plots.plt.subplots(figsize=(6, 3.6))
    ax.hist([sizes[:, k] for k in range(sizes.shape[1])], bins=40, label=labels)
    ax.axvline(cfg.max_length, color="red", linestyle="--", label=f"max_length {cfg.max_length}")
    ax.set(title=f"Tokens per row: {Path(cfg.data).name}", xlabel="tokens (after truncation)", ylabel="rows")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plots.plt.close(fig)
    return path
