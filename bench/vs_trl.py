"""alignkit against TRL on the same model, data and settings: throughput, memory, MFU and first-step loss.

    python bench/vs_trl.py --mode sft [--lora] [--quick] [--model smollm2-135m-instruct] [--steps 6]
    python bench/vs_trl.py --mode dpo [--lora] [--quick]
    python bench/vs_trl.py --mode sft --baseline ../alignkit-before   # also an older checkout, back to back

Each tool runs in its own subprocess (so peak RSS is its own): alignkit, TRL with its defaults, and TRL tuned as
a speed-aware user would (no gradient checkpointing, padding-free where it accepts it). The synthetic data
is generated from a seed: chat rows with prompts and completions of 20–300 tokens each. Reported per tool:
trained tokens/s (SFT: completion tokens; DPO: prompt+chosen and prompt+rejected tokens), pairs/s (DPO),
peak RSS, MFU against a matmul peak measured in this run in the precision both ran in, first-step loss,
start-up time, and the alignkit/TRL ratios; first the CPU's name and the flags that decide bf16 speed. Warm-up
steps are excluded from the timing; time spent on reference log-probs counts.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ["the", "a", "film", "story", "river", "light", "city", "night", "music", "garden", "window",
         "letter", "morning", "winter", "friend", "voice", "road", "table", "paper", "mountain", "ocean",
         "silver", "quiet", "bright", "slow", "green", "ancient", "gentle", "sudden", "careful", "distant",
         "warm", "walks", "reads", "builds", "finds", "carries", "remembers", "opens", "follows", "watches",
         "writes", "sings", "holds"]


# ---------------------------------------------------------------- data and peak

def sentence(rng: random.Random, tokens: int, tokenizer) -> str:
    """Random words until the text is about `tokens` tokens long."""
    words = []
    while True:
        words.append(rng.choice(WORDS))
        if len(words) % 8 == 0 and len(tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]) >= tokens:
            return " ".join(words) + "."


def make_rows(mode: str, count: int, seed: int, tokenizer, chat: bool = True) -> list[dict]:
    """Chat rows (message lists), or plain strings: TRL then trains on prompt + completion + eos, which is
    alignkit's `plain` template, so the two tokenise identically and first-step losses can be compared exactly."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        text = sentence(rng, rng.randint(20, 300), tokenizer)
        prompt = [{"role": "user", "content": text}] if chat else text

        def answer():
            reply = sentence(rng, rng.randint(20, 300), tokenizer)
            return [{"role": "assistant", "content": reply}] if chat else " " + reply

        if mode == "sft":
            rows.append({"prompt": prompt, "completion": answer()})
        else:
            rows.append({"prompt": prompt, "chosen": answer(), "rejected": answer()})
    return rows


CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_kind() -> str:
    """The CPU's name, the flags that decide bf16 speed, and what torch makes of them."""
    import torch

    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = set(next(line for line in text.splitlines() if line.startswith("flags")).split(":")[1].split())
        model = next((line.split(":")[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    except (OSError, StopIteration):
        flags, model = set(), "?"
    shown = " ".join(f for f in CPU_FLAGS if f in flags) or "none of " + " ".join(CPU_FLAGS)
    return (f"{model}; flags: {shown}; torch CPU capability {torch.backends.cpu.get_cpu_capability()}; "
            f"fast bf16 (mkldnn): {torch.ops.mkldnn._is_mkldnn_bf16_supported()}; {os.cpu_count()} cores")


def resolved_precision(asked: str) -> str:
    """auto: bf16 where this CPU computes it natively (alignkit's `dtype: auto` rule), else fp32."""
    import torch

    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if asked == "bf16" and not native:
        raise SystemExit("--precision bf16: this CPU has no native bf16, where alignkit's dtype auto trains in fp32")
    return asked if asked != "auto" else "bf16" if native else "fp32"


def matmul_peak(precision: str, seconds: float = 3.0) -> tuple[float, int]:
    """FLOP/s of square matmuls in the precision the run uses, and their size. The size is picked so that one
    matmul takes at most about a tenth of `seconds` (emulated bf16 is hundreds of times slower than native)."""
    import torch

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    size = 256
    while True:
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        a @ b
        start = time.perf_counter()
        a @ b
        if size >= 2048 or time.perf_counter() - start > seconds / 80:
            break
        size *= 2
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * size**3 * count / (time.perf_counter() - start), size


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------- workers (one per subprocess)

def run_alignkit(args, rows_path: Path, out: Path) -> dict:
    from alignkit.api import make_dpo_config, make_sft_config
    from alignkit.recipes import dpo, sft

    common = {"model": args.model, "data": [str(rows_path)], "output_dir": str(out / "run"), "batch_size": 4,
              "max_length": 512, "lr": 1e-5, "max_steps": args.warmup + args.steps, "save_steps": 0,
              "lr_scheduler": "constant", "lora": args.lora, "lora_r": 16, "lora_alpha": 32, "seed": 0,
              "logging_steps": 1, "overwrite": True,
              "chat_template": None if args.format == "chat" else "plain", "compile": args.compile,
              "dtype": "auto" if args.precision == "bf16" else "fp32"}
    started = time.perf_counter()
    recipe, make = (sft, make_sft_config) if args.mode == "sft" else (dpo, make_dpo_config)
    summary = recipe.run(make(common))
    rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    measured = rows[args.warmup:]
    seconds = measured[-1]["elapsed_s"] - rows[args.warmup - 1]["elapsed_s"]
    return {"first_loss": rows[0]["loss"], "seconds": seconds,
            "trained_tokens": sum(r["tokens"] for r in measured) if args.mode == "sft" else None,
            "pairs": sum(r["pairs"] for r in measured) if args.mode == "dpo" else None,
            "startup_s": summary["wall_seconds"] - summary["train_seconds"], "total_s": time.perf_counter() - started}


def run_trl(args, rows_path: Path, out: Path, tuned: bool) -> dict:
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback

    from alignkit.models import resolve_model

    rows = [json.loads(line) for line in rows_path.read_text().splitlines()]
    model_path = str(resolve_model(args.model))
    steps = args.warmup + args.steps
    settings = dict(output_dir=str(out / "trl"), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-5,
                    lr_scheduler_type="constant", logging_steps=1, report_to="none", save_strategy="no",
                    bf16=args.precision == "bf16", use_cpu=True, max_length=512, seed=0,
                    model_init_kwargs={"dtype": "float32"})
    if tuned:
        settings.update(gradient_checkpointing=False, padding_free=args.mode == "sft" and args.padding_free)
    peft_config = None
    if args.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                 task_type="CAUSAL_LM")
    times: list[float] = []
    trained: list[int] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *_, **__):
            times.append(time.perf_counter())

    started = time.perf_counter()
    if args.mode == "sft":
        trainer = trl.SFTTrainer(model=model_path, args=trl.SFTConfig(**settings), peft_config=peft_config,
                                 train_dataset=Dataset.from_list(rows))
        collate = trainer.data_collator

        def counting(examples):
            batch = collate(examples)
            trained.append(int((batch["labels"][:, 1:] != -100).sum()))
            return batch

        trainer.data_collator = counting
    else:
        trainer = trl.DPOTrainer(model=model_path, args=trl.DPOConfig(**settings), peft_config=peft_config,
                                 train_dataset=Dataset.from_list(rows))
    trainer.add_callback(Clock())
    train_start = time.perf_counter()
    trainer.train()
    first_loss = next(r["loss"] for r in trainer.state.log_history if "loss" in r)
    seconds = times[-1] - times[args.warmup - 1]
    return {"first_loss": first_loss, "seconds": seconds,
            "trained_tokens": sum(trained[args.warmup:steps]) if args.mode == "sft" else None,
            "pairs": 4 * args.steps if args.mode == "dpo" else None,
            "startup_s": train_start - started, "total_s": time.perf_counter() - started}


def worker(args) -> None:
    out = Path(args.workdir)
    rows_path = out / "rows.jsonl"
    if args.worker in ("alignkit", "alignkit-baseline"):
        result = run_alignkit(args, rows_path, out / args.worker)
    else:
        result = run_trl(args, rows_path, out / args.worker, tuned=args.worker == "trl-tuned")
    result["peak_rss_mib"] = peak_rss_mib()
    (out / f"{args.worker}.json").write_text(json.dumps(result))


# ---------------------------------------------------------------- the comparison

def token_count(tokenizer, prompt, completion=None) -> int:
    """Tokens of the prompt (with the generation prompt), or of prompt + completion, capped at max_length."""
    if isinstance(prompt, str):
        text = prompt + (completion + tokenizer.eos_token if completion is not None else "")
    elif completion is None:
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    else:
        text = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    return min(512, len(tokenizer(text, add_special_tokens=False)["input_ids"]))


def dpo_tokens_per_pair(rows: list[dict], tokenizer) -> float:
    """Tokens of prompt+chosen and prompt+rejected, as a padded or per-sequence layout would read them."""
    pairs = sum(token_count(tokenizer, r["prompt"], r[side]) for r in rows for side in ("chosen", "rejected"))
    return pairs / len(rows)


def sft_tokens_per_trained(rows: list[dict], tokenizer) -> float:
    """All tokens a forward pass reads per trained (completion) token: prompts are processed too."""
    total = sum(token_count(tokenizer, r["prompt"], r["completion"]) for r in rows)
    prompts = sum(token_count(tokenizer, r["prompt"]) for r in rows)
    return total / max(1, total - prompts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["sft", "dpo"], required=True)
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="alias, folder or .gguf (default: %(default)s)")
    parser.add_argument("--lora", action="store_true", help="LoRA r16 alpha32 on all linear layers, both tools")
    parser.add_argument("--steps", type=int, default=6, help="measured steps (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=2, help="steps before timing starts (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="3 measured steps, 1 warm-up, TRL defaults skipped")
    parser.add_argument("--padding-free", action="store_true", help="ask TRL tuned for padding_free (SFT)")
    parser.add_argument("--format", choices=["auto", "chat", "plain"], default="auto",
                        help="chat rows, or plain strings for an exact first-loss comparison; auto: chat where the "
                             "model has a chat template, else plain (default: %(default)s)")
    parser.add_argument("--compile", choices=["on", "off", "auto"], default="on",
                        help="alignkit's compile setting (default: %(default)s: the measured steps stand for a long "
                             "run, where auto compiles; compiling happens in the warm-up steps)")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                        help="both tools: auto = bf16 autocast where the CPU computes bf16 natively (AVX512-BF16/AMX), "
                             "fp32 elsewhere (AVX2-only CPUs emulate bf16, slowly); fp32 or bf16 = that everywhere "
                             "(default: %(default)s)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--baseline", type=Path,
                        help="also run the alignkit checkout in this folder (e.g. a git worktree of the commit before "
                             "a change), right after this one, and print their ratio")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup = 3, 1
    if args.worker:
        worker(args)
        return
    args.precision = resolved_precision(args.precision)

    from transformers import AutoTokenizer

    from alignkit.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(args.model))
    if args.format == "auto":  # TRL renders chat rows with the tokenizer's own template only
        args.format = "chat" if tokenizer.chat_template else "plain"
    config = json.loads((resolve_model(args.model) / "config.json").read_text())
    workdir = Path(tempfile.mkdtemp(prefix="alignkit-bench-"))
    rows = make_rows(args.mode, 4 * (args.warmup + args.steps), seed=0, tokenizer=tokenizer,
                     chat=args.format == "chat")
    (workdir / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    peak, size = matmul_peak(args.precision)
    print(f"CPU: {cpu_kind()}\nprecision: {args.precision} (both tools); {args.precision} matmul peak "
          f"({size}x{size}): {peak / 1e9:.0f} GFLOP/s; workdir {workdir}", flush=True)

    from transformers import AutoConfig, AutoModelForCausalLM

    with __import__("torch").device("meta"):
        n_params = sum(p.numel() for p in AutoModelForCausalLM.from_config(
            AutoConfig.from_pretrained(resolve_model(args.model))).parameters())
    tools = (["alignkit"] + (["alignkit-baseline"] if args.baseline else []) + ["trl-tuned"] +
             ([] if args.quick else ["trl-defaults"]))
    here = Path(__file__).resolve().parents[1]
    results = {}
    for tool in tools:
        command = [sys.executable, __file__, "--worker", tool, "--workdir", str(workdir), "--mode", args.mode,
                   "--model", args.model, "--steps", str(args.steps), "--warmup", str(args.warmup), "--format",
                   args.format, "--compile", args.compile, "--precision", args.precision]
        command += ["--lora"] if args.lora else []
        command += ["--padding-free"] if args.padding_free else []
        print(f"running {tool} ...", flush=True)
        source = args.baseline.resolve() if tool == "alignkit-baseline" else here
        done = subprocess.run(command, capture_output=True, text=True,
                              env={**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(source)})
        if done.returncode != 0:
            print(f"{tool} failed:\n{done.stderr[-3000:]}")
            continue
        results[tool] = json.loads((workdir / f"{tool}.json").read_text())

    per_pair = dpo_tokens_per_pair(rows, tokenizer) if args.mode == "dpo" else None
    read_per_trained = sft_tokens_per_trained(rows, tokenizer) if args.mode == "sft" else None
    print(f"\nmode {args.mode}{' + LoRA' if args.lora else ''}, {args.format} rows, model {args.model} "
          f"({n_params / 1e6:.1f}M params, vocabulary {config.get('vocab_size')}), batch 4, max_length 512, "
          f"{args.steps} measured steps after {args.warmup} warm-up, alignkit compile {args.compile}, precision "
          f"{args.precision}")
    print(f"{'tool':<18}{'tokens/s':>10}{'pairs/s':>9}{'peak RSS MiB':>14}{'MFU %':>7}{'first loss':>12}"
          f"{'start-up s':>12}")
    for tool, r in results.items():
        # Model FLOPs (attention excluded): 6N per token through forward+backward, 2N per reference token.
        if args.mode == "sft":
            r["tokens_per_s"] = r["trained_tokens"] / r["seconds"]
            flops = 6 * n_params * r["tokens_per_s"] * read_per_trained
            r["pairs_per_s"] = None
        else:
            r["pairs_per_s"] = r["pairs"] / r["seconds"]
            r["tokens_per_s"] = r["pairs_per_s"] * per_pair
            flops = (6 + 2) * n_params * r["tokens_per_s"]
        r["mfu"] = flops / peak
        pairs = f"{r['pairs_per_s']:.3f}" if r["pairs_per_s"] is not None else "-"
        print(f"{tool:<18}{r['tokens_per_s']:>10.1f}{pairs:>9}{r['peak_rss_mib']:>14.0f}{100 * r['mfu']:>7.1f}"
              f"{r['first_loss']:>12.4f}{r['startup_s']:>12.1f}")
    ours = results.get("alignkit")
    for tool in ("alignkit-baseline", "trl-tuned", "trl-defaults"):
        if ours and tool in results:
            theirs = results[tool]
            key = "pairs_per_s" if args.mode == "dpo" else "tokens_per_s"
            print(f"alignkit / {tool}: speed x{ours[key] / theirs[key]:.2f}, peak memory "
                  f"x{ours['peak_rss_mib'] / theirs['peak_rss_mib']:.2f}, first-loss difference "
                  f"{abs(ours['first_loss'] - theirs['first_loss']):.2e}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "cpu": cpu_kind(), "peak_flops": peak,
                                               "results": results}, indent=1, default=str))


if __name__ == "__main__":
    main()
