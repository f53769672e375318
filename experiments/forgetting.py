"""Does general SFT erode a code specialist, and does mixing a little code back in limit it? (Dong et al. 2023)

    python experiments/forgetting.py                       # Qwen2.5-Coder-0.5B-Instruct, 82 HumanEval problems
    python experiments/forgetting.py --problems 0 --general 192 --k 0.25 0.5   # all 164 problems, more data

Qwen2.5-Coder-0.5B-Instruct's greedy HumanEval pass@1 (alignkit's `chat` prompt format, bf16 autocast where the
CPU has it) is measured three ways on the same problems: before any training; after LoRA SFT on GENERAL ShareGPT
conversations without code; and after LoRA SFT on the same conversations plus k × GENERAL ShareGPT conversations
about Python code, for each k. ShareGPT comes from its PyPI wheel (experiments/sharegpt.py). A conversation is
"code" when an assistant turn holds a fenced block and Python (a ```python fence, `def ` or `import `), "general"
when no turn holds a fence, `def ` or `import `; the rest is left out. Both samples are drawn with --seed. The
HumanEval problems are a seeded sample of --problems of the 164 (0: all), the same for every model.

Each model's pass@1 comes with its 95% Wilson interval; each trained model is also compared with the base model on
the same problems: the difference in pass@1, how many problems it newly fails and newly passes, and McNemar's
exact two-sided p-value over those discordant problems. Writes OUTPUT_DIR/table.md, results.json and every
sample with its verdict (OUTPUT_DIR/NAME/humaneval.jsonl). Running the same command again reuses finished
trainings and evaluations; delete the output folder to start over.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from alignkit.api import sft  # noqa: E402
from alignkit.eval import humaneval  # noqa: E402
from alignkit.models.load import load_model, load_tokenizer, resolve_model  # noqa: E402
from alignkit.training.backend import mixed_precision  # noqa: E402
from experiments.sharegpt import records  # noqa: E402


def assistant_text(record: dict) -> str:
    return "\n".join(turn.get("value", "") for turn in record["conversations"] if turn.get("from") == "gpt")


def kind_of(record: dict) -> str | None:
    """code, general, or None (code-like but not Python, or Python outside a fence: left out of both)."""
    text = "\n".join(turn.get("value", "") for turn in record["conversations"])
    codeish = "```" in text or "def " in text or "import " in text
    if not codeish:
        return "general"
    reply = assistant_text(record)
    if "```" in reply and ("```python" in reply or "def " in reply or "import " in reply):
        return "code"
    return None


def sample_conversations(source, general: int, code: int, seed: int) -> tuple[list[dict], list[dict]]:
    """`general` general and `code` code conversations, each a seeded sample of its kind in file order."""
    kinds: dict[str, list[dict]] = {"general": [], "code": []}
    for record in source:
        kind = kind_of(record)
        if kind is not None:
            kinds[kind].append(record)
    for kind, wanted in (("general", general), ("code", code)):
        if len(kinds[kind]) < wanted:
            raise SystemExit(f"only {len(kinds[kind])} {kind} conversations, {wanted} asked for")
    pick = random.Random(seed)
    return (pick.sample(kinds["general"], general) if general else [],
            pick.sample(kinds["code"], code) if code else [])


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def problem_subset(problems: list[dict], count: int, seed: int) -> list[dict]:
    """`count` problems in file order, a seeded sample (0 or more than there are: all)."""
    if not count or count >= len(problems):
        return problems
    chosen = sorted(random.Random(seed).sample(range(len(problems)), count))
    return [problems[i] for i in chosen]


def train(model: str, data: list[Path], folder: Path, args) -> Path:
    final = folder / "final"
    if not final.is_dir():
        sft({"model": model, "data": [str(p) for p in data], "output_dir": str(folder), "data_format": "sharegpt",
             "on_bad_row": "skip", "lora": True, "lora_r": 16, "lora_alpha": 32, "lr": args.lr,
             "epochs": args.epochs, "batch_size": args.batch_size, "max_length": args.max_length,
             "warmup_ratio": 0.1, "seed": args.seed, "save_steps": 0, "logging_steps": 1})
    return final


def score(model_spec: str, problems: list[dict], folder: Path, args) -> dict:
    """The model's HumanEval result on `problems` (cached in FOLDER/humaneval.json), with per-problem verdicts."""
    done = folder / "humaneval.json"
    if done.is_file():
        return json.loads(done.read_text())
    path = resolve_model(model_spec)
    model, tokenizer = load_model(path).eval(), load_tokenizer(path)
    folder.mkdir(parents=True, exist_ok=True)
    samples = folder / "humaneval.jsonl"
    result = humaneval.evaluate(model, tokenizer, problems, max_new_tokens=args.max_new_tokens,
                                batch_size=args.eval_batch_size, samples_file=samples,
                                prompt_format=args.prompt_format, autocast=mixed_precision("auto") == "bf16")
    result["passed"] = {r["task_id"]: r["passed"] for r in map(json.loads, samples.read_text().splitlines())}
    done.write_text(json.dumps(result, indent=1))
    return result


def paired(base: dict, other: dict) -> dict:
    """The change from `base` to `other` on the same problems, with McNemar's exact two-sided p-value."""
    lost = sum(1 for t, ok in base["passed"].items() if ok and not other["passed"][t])
    gained = sum(1 for t, ok in base["passed"].items() if not ok and other["passed"][t])
    n = lost + gained
    tail = sum(math.comb(n, i) for i in range(min(lost, gained) + 1)) / 2 ** n if n else 1.0
    return {"difference": other["pass@1"] - base["pass@1"], "newly_failed": lost, "newly_passed": gained,
            "mcnemar_p": min(1.0, 2 * tail)}


def results_table(results: dict) -> str:
    lines = ["| model | SFT data | pass@1 | 95% interval | vs base | newly failed / passed | McNemar p |",
             "|---|---|---|---|---|---|---|"]
    for name, entry in results["models"].items():
        low, high = entry["pass@1_ci95"]
        change = entry.get("vs_base")
        versus = (f"{change['difference']:+.3f} | {change['newly_failed']} / {change['newly_passed']} | "
                  f"{change['mcnemar_p']:.3f}") if change else "— | — | —"
        lines.append(f"| {name} | {entry['data']} | {entry['pass@1']:.3f} | {low:.3f}–{high:.3f} | {versus} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--output-dir", default="runs/forgetting")
    parser.add_argument("--general", type=int, default=96, help="general conversations (default: %(default)s)")
    parser.add_argument("--k", type=float, nargs="+", default=[0.25],
                        help="code conversations added, as fractions of --general (default: %(default)s)")
    parser.add_argument("--problems", type=int, default=82,
                        help="HumanEval problems, a seeded sample of the 164; 0 = all (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--eval-batch-size", type=int, default=8)
    parser.add_argument("--prompt-format", choices=humaneval.PROMPT_FORMATS, default="chat")
    parser.add_argument("--sharegpt", type=Path, help="a local copy of the ShareGPT JSON (default: fetched)")
    parser.add_argument("--humaneval-data", help="a local copy of HumanEval.jsonl(.gz) (default: fetched)")
    args = parser.parse_args(argv)
    out = Path(args.output_dir)
    started = time.time()

    codes = [round(k * args.general) for k in args.k]
    general, code = sample_conversations(records(args.sharegpt), args.general, max(codes, default=0), args.seed)
    general_file = write_jsonl(general, out / "data" / "general.jsonl")
    problems = problem_subset(humaneval.load_problems(args.humaneval_data), args.problems, args.seed)

    models = {"base": {"data": "none", "path": args.model},
              "general": {"data": f"{len(general)} general", "path": None, "files": [general_file]}}
    for k, count in zip(args.k, codes, strict=True):
        code_file = write_jsonl(code[:count], out / "data" / f"code-{count}.jsonl")
        models[f"general + k={k:g} code"] = {"data": f"{len(general)} general + {count} code", "path": None,
                                             "files": [general_file, code_file]}
    results: dict = {"models": {}}
    for name, entry in models.items():
        folder = out / name.replace(" ", "").replace("+", "-").replace("=", "")
        path = entry["path"] or str(train(args.model, entry["files"], folder, args))
        result = score(path, problems, folder, args)
        results["models"][name] = {"data": entry["data"], "pass@1": result["pass@1"],
                                   "pass@1_ci95": result["pass@1_ci95"], "passed": result["passed"]}
    base = results["models"]["base"]
    for name, entry in results["models"].items():
        if name != "base":
            entry["vs_base"] = paired(base, entry)
    results["_meta"] = {"model": args.model, "problems": len(problems), "problem_ids": [p["task_id"] for p in problems],
                        "seed": args.seed, "general": args.general, "k": args.k, "lr": args.lr, "epochs": args.epochs,
                        "batch_size": args.batch_size, "max_length": args.max_length,
                        "prompt_format": args.prompt_format, "max_new_tokens": args.max_new_tokens,
                        "minutes": round((time.time() - started) / 60, 1)}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    table = results_table(results)
    (out / "table.md").write_text(table)
    print(table)
    return results


if __name__ == "__main__":
    main()
