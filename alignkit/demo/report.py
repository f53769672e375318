"""The demo's `report.md` and its plots, written from the runs' metrics and the evaluation figures."""

from __future__ import annotations

from pathlib import Path

from alignkit import plots


def _table(rows: list[list[str]]) -> str:
    head, *body = rows
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])


def _quote(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ⏎ ")


def write_report(out: Path, summary: dict) -> Path:
    figures = out / "plots"
    figures.mkdir(exist_ok=True)
    sft_rows = plots.read_metrics(out / "sft")
    dpo_rows = {f"β={r['beta']:g}": plots.read_metrics(out / r["run"]) for r in summary["dpo"]}
    made = {
        "loss": plots.lines(figures / "loss.png", "Training loss", "loss",
                            {"SFT": plots.series(sft_rows, "loss"),
                             **{f"DPO {name}": plots.series(rows, "loss") for name, rows in dpo_rows.items()}}),
        "margins": plots.lines(figures / "dpo_margins.png", "DPO reward margins", "rewards/margins",
                               {name: plots.series(rows, "rewards/margins") for name, rows in dpo_rows.items()}),
        "accuracies": plots.lines(figures / "dpo_accuracies.png", "DPO reward accuracies", "rewards/accuracies",
                                  {name: plots.series(rows, "rewards/accuracies") for name, rows in dpo_rows.items()}),
        "rewards": plots.histograms(figures / "rewards.png", "Held-out reward (VADER compound)", "reward",
                                    {"SFT": summary["sft"]["rewards"],
                                     **{f"DPO β={r['beta']:g}": r["rewards"] for r in summary["dpo"]}}),
        "frontier": plots.points(figures / "reward_kl.png", "Reward vs KL to the SFT model",
                                 "sequence KL(π‖π_SFT), nats", "mean held-out reward",
                                 [("SFT", 0.0, summary["sft"]["mean_reward"])]
                                 + [(f"β={r['beta']:g}", r["kl_to_sft"], r["mean_reward"]) for r in summary["dpo"]],
                                 connect=True),
    }
    sft = summary["sft"]
    table = [["model", "mean reward ± s.e.", "win rate vs SFT", "KL to SFT (nats)", "format rate"],
             ["SFT", f"{sft['mean_reward']:.3f} ± {sft['reward_stderr']:.3f}", "—", "0",
              f"{summary['skill']['format_rate_sft']:.2f}"]]
    for r in summary["dpo"]:
        table.append([f"DPO β={r['beta']:g}", f"{r['mean_reward']:.3f} ± {r['reward_stderr']:.3f}",
                      f"{r['win_rate_vs_sft']:.2f}", f"{r['kl_to_sft']:.2f}", f"{r['format_rate']:.2f}"])
    samples = [["model", "prompt", "completion"]]
    samples += [["base", _quote(s["prompt"]), _quote(s["completion"])] for s in summary["base_samples"]]
    samples += [["SFT", _quote(s["prompt"]), _quote(s["completion"])] for s in sft["samples"][:3]]
    for r in summary["dpo"]:
        samples += [[f"DPO β={r['beta']:g}", _quote(s["prompt"]), _quote(s["completion"])] for s in r["samples"][:3]]
    plan = summary["plan"]
    prefs = summary["prefs"]
    text = f"""# alignkit demo: controlled sentiment with SFT → DPO

Model: `{summary['model']}`{' (quick run)' if summary['quick'] else ''}. Wall time: {summary['wall_seconds']:.0f} s.
Stage times (s): {', '.join(f'{k} {v}' for k, v in summary['timings_s'].items())}.

## 1. SFT: the review format
The SFT data (`data/sft.jsonl`, generated from templates) teaches two sentences of review followed by
`Rating: N/5` agreeing with the review's sentiment. Format rate on {plan['eval_prompts']} held-out prompts
(completion ends with a rating line that agrees with its VADER sentiment): base model
**{summary['skill']['format_rate_base']:.2f}** → SFT model **{summary['skill']['format_rate_sft']:.2f}**.

## 2. Preference data
{prefs['prompts']} training prompts × {plan['n']} samples from the SFT model, scored with VADER's compound score;
best vs worst per prompt: **{prefs['pairs']} pairs** (mean sample reward {prefs['mean_reward']:.3f};
{prefs['skipped_prompts']} prompts without a reward spread). See `data/prefs.jsonl`.

## 3-4. DPO and held-out evaluation
LoRA (r 16, α 32), lr {plan['dpo_lr']}, {plan['dpo_epochs']} epochs, the SFT model as reference.
Held-out: {plan['eval_prompts']} prompts × {plan['eval_samples']} samples (temperature 1, {plan['max_new_tokens']}
new tokens). KL is Σ over generated tokens of log π − log π_SFT, averaged over the DPO model's own samples.

{_table(table)}

![loss]({made['loss'].relative_to(out)})
![margins]({made['margins'].relative_to(out)})
![accuracies]({made['accuracies'].relative_to(out)})
![rewards]({made['rewards'].relative_to(out)})
![reward vs KL]({made['frontier'].relative_to(out)})

## Samples (⏎ marks a line break)
{_table(samples)}
"""
    report = out / "report.md"
    report.write_text(text, encoding="utf-8")
    return report
