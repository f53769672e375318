"""`alignkit rm` against TRL's RewardTrainer on the same model, data and settings: speed, memory, first-step loss.

    python bench/rm_vs_trl.py [--lora] [--quick] [--model smollm2-135m-instruct] [--steps 6] [--json OUT]

Each tool runs in its own subprocess (so peak RSS is its own): alignkit, TRL tuned (no gradient checkpointing)
and TRL with its RewardConfig defaults (gradient checkpointing on). Both sides run the same precision: bf16
autocast over fp32 weights where this CPU has fast bf16 (TRL's bf16=True), else fp32; each side's precision is
printed, with the CPU's flags. The pairs come from `vs_trl.make_rows` (prompts and answers of 20–300 tokens),
as plain strings by default: TRL then scores prompt + answer + eos, which is alignkit's `plain` template, so the
first-step losses can be compared exactly. Batch 4 pairs, max_length 1024 (TRL drops a longer pair where
alignkit cuts it, so no pair here comes near it), lr 1e-5 constant, full fine-tuning
(or LoRA r16 alpha32 on all linear layers, score head trained). Warm-up steps are excluded from the timing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vs_trl import cpu_kind, make_rows, peak_rss_mib, resolved_precision  # noqa: E402

MAX_LENGTH = 1024


def tokens_per_pair(rows: list[dict], tokenizer) -> float:
    """Tokens of prompt+chosen and prompt+rejected (what a padded or per-sequence layout reads), per pair."""
    def count(prompt, answer) -> int:
        if isinstance(prompt, str):
            return len(tokenizer(prompt + answer + tokenizer.eos_token, add_special_tokens=False)["input_ids"])
        return len(tokenizer.apply_chat_template(prompt + answer, tokenize=True))

    return sum(count(r["prompt"], r[side]) for r in rows for side in ("chosen", "rejected")) / len(rows)


def run_alignkit(args, rows_path: Path, out: Path) -> dict:
    from alignkit.api import make_config
    from alignkit.config import RMConfig
    from alignkit.recipes import rm

    cfg = make_config(RMConfig, {
        "model": args.model, "data": [str(rows_path)], "output_dir": str(out / "run"), "batch_size": 4,
        "max_length": MAX_LENGTH, "lr": 1e-5, "max_steps": args.warmup + args.steps, "save_steps": 0,
        "lr_scheduler": "constant", "lora": args.lora, "lora_r": 16, "lora_alpha": 32, "seed": 0,
        "logging_steps": 1, "overwrite": True, "chat_template": None if args.format == "chat" else "plain",
        "compile": args.compile, "dtype": "auto" if resolved_precision("auto") == "bf16" else "fp32"})
    started = time.perf_counter()
    summary = rm.run(cfg)
    rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    seconds = rows[-1]["elapsed_s"] - rows[args.warmup - 1]["elapsed_s"]
    from alignkit.training.backend import mixed_precision

    return {"first_loss": rows[0]["loss"], "seconds": seconds, "pairs": sum(r["pairs"] for r in rows[args.warmup:]),
            "precision": f"fp32 weights, mixed_precision {mixed_precision(cfg.dtype)}",
            "startup_s": summary["wall_seconds"] - summary["train_seconds"], "total_s": time.perf_counter() - started}


def run_trl(args, rows_path: Path, out: Path, tuned: bool) -> dict:
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback

    from alignkit.models import resolve_model

    rows = [json.loads(line) for line in rows_path.read_text().splitlines()]
    steps = args.warmup + args.steps
    settings = dict(output_dir=str(out / "trl"), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-5,
                    lr_scheduler_type="constant", logging_steps=1, report_to="none", save_strategy="no",
                    bf16=resolved_precision("auto") == "bf16", use_cpu=True, max_length=MAX_LENGTH, seed=0,
                    model_init_kwargs={"dtype": "float32"})
    if tuned:
        settings.update(gradient_checkpointing=False)
    peft_config = None
    if args.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                 task_type="SEQ_CLS")
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *_, **__):
            times.append(time.perf_counter())

    started = time.perf_counter()
    trainer = trl.RewardTrainer(model=str(resolve_model(args.model)), args=trl.RewardConfig(**settings),
                                peft_config=peft_config, train_dataset=Dataset.from_list(rows))
    trainer.add_callback(Clock())
    train_start = time.perf_counter()
    trainer.train()
    first_loss = next(r["loss"] for r in trainer.state.log_history if "loss" in r)
    return {"first_loss": first_loss, "seconds": times[-1] - times[args.warmup - 1], "pairs": 4 * args.steps,
            "precision": f"fp32 weights, mixed_precision {trainer.accelerator.mixed_precision}, gradient "
                         f"checkpointing {trainer.args.gradient_checkpointing}",
            "startup_s": train_start - started, "total_s": time.perf_counter() - started}


def worker(args) -> None:
    out = Path(args.workdir)
    rows_path = out / "rows.jsonl"
    if args.worker == "alignkit":
        result = run_alignkit(args, rows_path, out / args.worker)
    else:
        result = run_trl(args, rows_path, out / args.worker, tuned=args.worker == "trl-tuned")
    result["peak_rss_mib"] = peak_rss_mib()
    (out / f"{args.worker}.json").write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="alias, folder or .gguf (default: %(default)s)")
    parser.add_argument("--lora", action="store_true", help="LoRA r16 alpha32 on all linear layers, both tools")
    parser.add_argument("--steps", type=int, default=6, help="measured steps (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=2, help="steps before timing starts (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="3 measured steps, 1 warm-up, TRL defaults skipped")
    parser.add_argument("--format", choices=["chat", "plain"], default="plain",
                        help="plain strings (exact first-loss comparison) or chat rows (default: %(default)s)")
    parser.add_argument("--compile", choices=["on", "off", "auto"], default="on",
                        help="alignkit's compile setting (default: %(default)s: the measured steps stand for a long "
                             "run, where auto compiles; compiling happens in the warm-up steps)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup = 3, 1
    if args.worker:
        worker(args)
        return

    from transformers import AutoTokenizer

    from alignkit.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(args.model))
    workdir = Path(tempfile.mkdtemp(prefix="alignkit-rm-bench-"))
    rows = make_rows("dpo", 4 * (args.warmup + args.steps), seed=0, tokenizer=tokenizer, chat=args.format == "chat")
    (workdir / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"CPU: {cpu_kind()}; workdir {workdir}", flush=True)
    tools = ["alignkit", "trl-tuned"] + ([] if args.quick else ["trl-defaults"])
    results = {}
    for tool in tools:
        command = [sys.executable, __file__, "--worker", tool, "--workdir", str(workdir), "--model", args.model,
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--format", args.format,
                   "--compile", args.compile] + (["--lora"] if args.lora else [])
        print(f"running {tool} ...", flush=True)
        done = subprocess.run(command, capture_output=True, text=True,
                              env={**os.environ, "TQDM_DISABLE": "1",
                                   "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
        if done.returncode != 0:
            print(f"{tool} failed:\n{done.stderr[-3000:]}")
            continue
        results[tool] = json.loads((workdir / f"{tool}.json").read_text())

    per_pair = tokens_per_pair(rows, tokenizer)
    print(f"\nreward model{' + LoRA' if args.lora else ''}, {args.format} rows, model {args.model}, batch 4 pairs, "
          f"max_length {MAX_LENGTH}, {args.steps} measured steps after {args.warmup} warm-up, alignkit compile "
          f"{args.compile}")
    print(f"{'tool':<14}{'pairs/s':>9}{'tokens/s':>10}{'peak RSS MiB':>14}{'first loss':>12}{'start-up s':>12}  "
          "precision")
    for tool, r in results.items():
        r["pairs_per_s"] = r["pairs"] / r["seconds"]
        r["tokens_per_s"] = r["pairs_per_s"] * per_pair
        print(f"{tool:<14}{r['pairs_per_s']:>9.3f}{r['tokens_per_s']:>10.1f}{r['peak_rss_mib']:>14.0f}"
              f"{r['first_loss']:>12.4f}{r['startup_s']:>12.1f}  {r['precision']}")
    ours = results.get("alignkit")
    for tool in ("trl-tuned", "trl-defaults"):
        if ours and tool in results:
            theirs = results[tool]
            print(f"alignkit / {tool}: speed x{ours['pairs_per_s'] / theirs['pairs_per_s']:.2f}, peak memory "
                  f"x{ours['peak_rss_mib'] / theirs['peak_rss_mib']:.2f}, first-loss difference "
                  f"{abs(ours['first_loss'] - theirs['first_loss']):.2e}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "cpu": cpu_kind(), "results": results}, indent=1))


if __name__ == "__main__":
    main()
