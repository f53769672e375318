"""Offline DPO, online DPO, KTO and ORPO on the demo's controlled-sentiment task, over several seeds.

    python experiments/preference_methods.py --quick --seeds 0           # a smoke test: minutes
    python experiments/preference_methods.py --seeds 0,1,2 --output-dir runs/methods   # docs/kto-orpo.md

Per seed, `alignkit demo` (its measured size, or `--quick`) gives the SFT model, the preference pairs (best
against worst of 4 SFT samples per training prompt, scored by VADER) and the offline DPO model. From the same SFT
model, with the demo's preference settings (LoRA r 16, α 32, lr 5e-4 constant, batch 8, β or λ 0.1):
- online-dpo: 3 rounds, each sampling 4 completions per training prompt from the current policy, pairing best
  against worst and training on those pairs; the demo's DPO epochs split over the rounds, so the same number of
  optimizer steps as offline DPO; the reference stays the SFT model;
- kto: the same pairs as unpaired feedback (chosen: desirable, rejected: undesirable), the DPO epochs over
  those rows (twice DPO's steps: a row is one completion, a pair two);
- orpo: the same pairs, the DPO epochs, no reference model.
Every model is then judged as the demo judges DPO: 2 samples per held-out prompt, their mean VADER reward, the
win rate over the SFT model's samples and KL(π‖π_SFT) estimated on the model's own samples.

Writes OUTPUT_DIR/table.md (mean ± standard deviation over seeds, and every seed), results.json and
reward_kl.png. Running the same command again continues where it stopped; delete the output folder to start over.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from alignkit.api import make_dpo_config, make_kto_config, make_orpo_config  # noqa: E402
from alignkit.config import DemoConfig  # noqa: E402
from alignkit.demo import pipeline as demo  # noqa: E402
from alignkit.eval.kl import completion_logps  # noqa: E402
from alignkit.generation import generate  # noqa: E402
from alignkit.make_prefs import read_prompts, write_jsonl  # noqa: E402
from alignkit.models.load import load_model, load_tokenizer  # noqa: E402
from alignkit.recipes import kto, online_dpo, orpo  # noqa: E402
from alignkit.rewards import sentiment_reward  # noqa: E402
from alignkit.training.backend import mixed_precision  # noqa: E402

METHODS = ("dpo", "online-dpo", "kto", "orpo")
ROUNDS = 3
FIGURES = ("mean_reward", "win_rate_vs_sft", "kl_to_sft", "format_rate")


def feedback_rows(pairs: list[dict]) -> list[dict]:
    """Each pair as two unpaired KTO rows: its chosen completion desirable, its rejected one undesirable."""
    return [{"prompt": p["prompt"], "completion": p[side], "label": side == "chosen"}
            for p in pairs for side in ("chosen", "rejected")]


def train(method: str, folder: Path, plan: demo.Plan, seed: int) -> Path:
    """The method's final/ under `folder` (trained unless it is there already)."""
    run_dir, final = folder / method, folder / method / "final"
    if method == "dpo":
        return folder / "demo" / "dpo" / "final"
    if final.is_dir():
        return final
    sft, prefs = str(folder / "demo" / "sft" / "final"), folder / "demo" / "data" / "prefs.jsonl"
    settings = {**demo.preference_settings(plan, seed), "model": sft, "output_dir": str(run_dir), "beta": 0.1}
    if method == "online-dpo":
        online_dpo.run(make_dpo_config(**{**settings, "epochs": plan.dpo_epochs / ROUNDS}, online=True,
                                       prompts=str(folder / "demo" / "data" / "train_prompts.jsonl"),
                                       reward="sentiment", rounds=ROUNDS, n=plan.n, max_new_tokens=plan.max_new_tokens))
    elif method == "kto":
        rows = feedback_rows([json.loads(line) for line in prefs.read_text().splitlines()])
        write_jsonl(rows, folder / "kto.jsonl")
        kto.run(make_kto_config(**settings, data=[str(folder / "kto.jsonl")]))
    else:
        orpo.run(make_orpo_config(**settings, data=[str(prefs)]))
    return final


def judge_seed(folder: Path, plan: demo.Plan, seed: int, methods: list[str]) -> dict:
    """Every method's held-out figures for one seed, and the SFT model's."""
    reward, autocast = sentiment_reward(), mixed_precision("auto") == "bf16"
    sft_path = folder / "demo" / "sft" / "final"
    tokenizer, sft_model = load_tokenizer(sft_path), load_model(sft_path)
    prompts = read_prompts(str(folder / "demo" / "data" / "eval_prompts.jsonl"))
    sft_samples = generate(sft_model, tokenizer, prompts, n=plan.eval_samples, max_new_tokens=plan.max_new_tokens,
                           seed=seed + 1, autocast=autocast, desc="sampling SFT")
    sft_rewards = demo.score(sft_samples, prompts, reward)
    flat = [r for group in sft_rewards for r in group]
    figures = {"sft": {"mean_reward": demo._mean(flat), "win_rate_vs_sft": 0.5, "kl_to_sft": 0.0,
                       "format_rate": demo.format_rate(sft_samples, reward)}}
    sft_logps = partial(completion_logps, sft_model, pad_id=tokenizer.pad_token_id)
    for method in methods:
        started = time.time()
        final = train(method, folder, plan, seed)
        policy = load_model(final)
        result = demo.held_out(policy, tokenizer, prompts, plan, seed, reward, sft_rewards, autocast, method,
                               sft_logps)
        figures[method] = {**{k: result[k] for k in FIGURES}, "seconds": round(time.time() - started, 1),
                           "samples": result["samples"][:2]}
        del policy
    return figures


def spread(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def table(results: dict[int, dict], methods: list[str]) -> str:
    seeds = sorted(results)
    lines = [f"Seeds {', '.join(map(str, seeds))}: mean ± standard deviation over seeds (one value: one seed).", "",
             "| model | held-out reward | win rate vs SFT | KL to SFT (nats) | format rate | reward per seed |",
             "|---|---|---|---|---|---|"]
    for method in ["sft", *methods]:
        column = {k: [results[s][method][k] for s in seeds] for k in FIGURES}
        per_seed = ", ".join(f"{v:.3f}" for v in column["mean_reward"])
        lines.append(f"| {method} | {spread(column['mean_reward'])} | {spread(column['win_rate_vs_sft'])} | "
                     f"{spread(column['kl_to_sft'])} | {spread(column['format_rate'])} | {per_seed} |")
    return "\n".join(lines) + "\n"


def plot(results: dict[int, dict], methods: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for method in ["sft", *methods]:
        kls = [results[s][method]["kl_to_sft"] for s in sorted(results)]
        rewards = [results[s][method]["mean_reward"] for s in sorted(results)]
        dots = ax.scatter(kls, rewards, alpha=0.35, s=18)
        ax.errorbar(statistics.mean(kls), statistics.mean(rewards), fmt="o", color=dots.get_facecolor()[0][:3],
                    xerr=statistics.stdev(kls) if len(kls) > 1 else None,
                    yerr=statistics.stdev(rewards) if len(rewards) > 1 else None, capsize=3, label=method)
    ax.set(title="held-out reward against KL to the SFT model (dots: seeds; bars: ±1 sd)",
           xlabel="KL(π‖π_SFT), nats per sample", ylabel="mean VADER reward")
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="the demo's --quick size for every stage")
    parser.add_argument("--methods", default=",".join(METHODS), help="default: %(default)s")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="default: %(default)s")
    parser.add_argument("--output-dir", default="runs/preference-methods")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    if unknown := set(methods) - set(METHODS):
        parser.error(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
    plan = demo.QUICK if args.quick else demo.FULL
    out = Path(args.output_dir)
    results = {}
    for seed in seeds:
        folder, done = out / f"seed-{seed}", out / f"seed-{seed}" / "figures.json"
        if done.is_file() and set(json.loads(done.read_text())) >= {"sft", *methods}:
            results[seed] = json.loads(done.read_text())
            continue
        if not (folder / "demo" / "eval.json").is_file():
            demo.run(DemoConfig(model=args.model, output_dir=str(folder / "demo"), quick=args.quick, seed=seed,
                                overwrite=True))
        results[seed] = judge_seed(folder, plan, seed, methods)
        done.write_text(json.dumps(results[seed], indent=1))
    (out / "table.md").write_text(table(results, methods))
    (out / "results.json").write_text(json.dumps({"plan": vars(plan), "seeds": results}, indent=1))
    plot(results, methods, out / "reward_kl.png")
    print((out / "table.md").read_text())
    return results


if __name__ == "__main__":
    main()
