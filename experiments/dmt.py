"""A scaled-down reproduction of the data-composition study's training strategies (Dong et al. 2023,
arXiv 2310.05492, Table 1) on the embedded SmolLM2-135M-Instruct, with synthetic seeded data (`dmt_data.py`).

Strategies, each an `alignkit pipeline` plan written into OUTPUT_DIR/plans/:
- multi-task: math, code and general data in one stage;
- sequential: math, then code, then general, one stage each;
- mixed sequential: math + code, then general;
- DMT (dual-stage mixed fine-tuning): math + code, then general + a fraction k of the math and code data, for each
  k (stage one is the mixed-sequential stage one, trained once).
Every model is scored on held-out math (exact match), code (unit tests) and general (checked constraints) rows.
Writes OUTPUT_DIR/table.md (the shape of the paper's Table 1), results.json and dmt.png.

    python experiments/dmt.py --quick                 # a smoke test: minutes
    python experiments/dmt.py --output-dir runs/dmt   # the measured run in docs/data-mixtures.md

Running the same command again continues where it stopped (finished stages are kept); delete the output folder
to start over.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from fractions import Fraction
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from alignkit.config import PipelineConfig  # noqa: E402
from alignkit.errors import Interrupted, RunError, UserError  # noqa: E402
from alignkit.pipeline import run as run_pipeline  # noqa: E402
from alignkit.pipeline import score_stage  # noqa: E402
from experiments.dmt_data import write_all  # noqa: E402

ABILITIES = ("math", "code", "general")
SIZES = {"quick": {"train": 32, "eval": 8, "epochs": 1}, "full": {"train": 96, "eval": 24, "epochs": 2}}


def training_defaults(epochs: int, seed: int) -> dict:
    return {"lora": True, "lr": 5e-4, "lora_r": 16, "epochs": epochs, "batch_size": 8, "max_length": 256,
            "warmup_ratio": 0.1, "seed": seed, "save_steps": 0, "logging_steps": 5}


def strategies(data: dict[str, Path], ks: list[Fraction], specialists: Path) -> dict[str, list[dict]]:
    """{strategy: stages}; a DMT stage list starts from the mixed-sequential stage one (`specialists`)."""
    math, code, general = (str(data[a]) for a in ABILITIES)
    plans = {
        "multi-task": [{"name": "all", "method": "sft", "data": [math, code, general]}],
        "sequential": [{"name": "math", "method": "sft", "data": [math]},
                       {"name": "code", "method": "sft", "data": [code]},
                       {"name": "general", "method": "sft", "data": [general]}],
        "mixed sequential": [{"name": "specialists", "method": "sft", "data": [math, code]},
                             {"name": "general", "method": "sft", "data": [general]}],
    }
    for k in ks:
        plans[f"DMT k={k}"] = [{"name": "general-plus-k", "method": "sft", "model": str(specialists),
                                "data": [general, {"path": math, "fraction": str(k)},
                                         {"path": code, "fraction": str(k)}]}]
    return plans


def folder_name(strategy: str) -> str:
    return strategy.replace(" ", "-").replace("=", "").replace("/", "_")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a smoke test: 32 training and 8 eval rows per ability, 1 epoch (default 96, 24, 2)")
    parser.add_argument("--output-dir", default="runs/dmt-experiment")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--k", nargs="+", default=["1", "1/4", "1/16", "1/64"], help="DMT's specialist fractions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    args = parser.parse_args(argv)
    size = SIZES["quick" if args.quick else "full"]
    out = Path(args.output_dir)
    started = time.time()

    data = write_all(out / "data", size["train"], size["eval"], args.seed)
    evals = {a: str(data[f"eval_{a}"]) for a in ABILITIES}
    plan_base = {"model": args.model, "defaults": training_defaults(size["epochs"], args.seed), "evals": evals,
                 "eval_max_new_tokens": args.max_new_tokens}
    base = score_stage(args.model, out / "base", evals, plan_base)
    ks = [Fraction(k) for k in args.k]
    specialists = (out / folder_name("mixed sequential") / "01-specialists" / "final").resolve()
    results = {"base": {"final": base, "stages": []}}
    for strategy, stages in strategies(data, ks, specialists).items():
        plan_file = out / "plans" / f"{folder_name(strategy)}.yaml"
        plan_file.parent.mkdir(parents=True, exist_ok=True)
        plan_file.write_text(yaml.safe_dump({**plan_base, "stages": stages}, sort_keys=False))
        report = run_pipeline(PipelineConfig(plan=str(plan_file), output_dir=str(out / folder_name(strategy)),
                                             resume=True))
        results[strategy] = {"final": report["stages"][-1]["abilities"],
                             "stages": [{"name": s["name"], "abilities": s["abilities"],
                                         "sources": s["sources"]} for s in report["stages"]]}
    results["_meta"] = {"model": args.model, "sizes": size, "seed": args.seed, "ks": args.k,
                        "defaults": plan_base["defaults"], "minutes": round((time.time() - started) / 60, 1)}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    table = results_table(results)
    (out / "table.md").write_text(table)
    plot(results, out / "dmt.png")
    print(table)
    return results


def results_table(results: dict) -> str:
    lines = ["| strategy | math (exact match) | code (tests pass) | general (checks pass) | mean |",
             "|---|---|---|---|---|"]
    for strategy, result in results.items():
        if strategy.startswith("_"):
            continue
        scores = [result["final"][a] for a in ABILITIES]
        mean = sum(scores) / len(scores)
        lines.append(f"| {strategy} | " + " | ".join(f"{s:.3f}" for s in scores) + f" | {mean:.3f} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [s for s in results if not s.startswith("_")]
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(ABILITIES)
    for i, ability in enumerate(ABILITIES):
        ax.bar([x + i * width for x in range(len(names))], [results[n]["final"][ability] for n in names], width,
               label=ability)
    ax.set_xticks([x + width for x in range(len(names))], names, rotation=20, ha="right")
    ax.set_ylabel("held-out score")
    ax.set_ylim(0, 1)
    ax.set_title("SFT strategies on SmolLM2-135M (scaled-down Dong et al. 2023, Table 1)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    try:
        main()
    except (UserError, RunError) as err:
        sys.exit(f"dmt: error: {err}")
    except Interrupted as err:  # a stopped stage saved its checkpoint: running again resumes it
        print(f"dmt: {err}; run the same command again to continue", file=sys.stderr)
        sys.exit(err.code)
