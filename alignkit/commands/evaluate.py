"""`alignkit eval`: the numbers a run is judged by, for SFT data, preference data or sampled prompts.

- SFT rows: mean token NLL over completion tokens (`loss`) and `perplexity` = exp(loss).
- Preference rows: `reward_accuracy` = fraction of pairs with β(ℓθ−ℓref)(chosen) > (rejected), `logp_accuracy` =
  fraction with ℓθ(chosen) > ℓθ(rejected) (no reference), `reward_margin` and `logp_margin` their mean gaps.
- Abilities (`--abilities math=FILE code=FILE ...`): the fraction of rows each set's scorer passes on greedy
  replies (math exact match, code unit tests, general checks; see alignkit/eval/abilities.py).
- Benchmarks: `--benchmark humaneval` → pass@1 and pass@k with 95% intervals (alignkit/eval/humaneval.py);
  `--benchmark mt-bench --judge J [--baseline B]` → the judge's mean 1-10 grade per category and overall, and
  win/tie/loss against the baseline from both answer orders (alignkit/eval/mtbench.py).
- Prompts + reward: `mean_reward` over n samples per prompt, `win_rate` against --baseline (ties ½),
  `kl_to_reference` = mean Σ_t log π − log π_ref over the model's own samples (see alignkit/eval/kl.py).
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch

from alignkit.data.cache import load_sft_rows
from alignkit.data.packing import single
from alignkit.data.prefs import tokenize_preferences
from alignkit.data.sources import read_rows
from alignkit.data.templates import resolve_template
from alignkit.data.tokenize import Rendering
from alignkit.errors import UserError
from alignkit.eval.abilities import evaluate_sets
from alignkit.eval.judge import judge, model_preference, summarize
from alignkit.eval.kl import completion_logps, sequence_kl
from alignkit.generation import generate
from alignkit.make_prefs import read_prompts
from alignkit.models.load import load_adapter_model, load_model, load_tokenizer, resolve_model
from alignkit.rewards import load_reward
from alignkit.training.backend import mixed_precision
from alignkit.training.forward import pair_logps, unit_sequence_logps


def load_for_eval(spec: str):
    """The model (an adapter stays unmerged, so its base can serve as reference) and its tokenizer."""
    path = resolve_model(spec)
    tokenizer = load_tokenizer(path)
    if (path / "adapter_config.json").is_file():
        return load_adapter_model(path).eval(), tokenizer
    return load_model(path).eval(), tokenizer


def reference_of(model, ref_spec: str | None):
    """A context manager giving the reference model: --ref-model, else the base under the adapter, else none."""
    if ref_spec is not None:
        ref = load_model(resolve_model(ref_spec)).eval()
        return contextlib.nullcontext(ref)
    if hasattr(model, "disable_adapter"):
        @contextlib.contextmanager
        def base():
            with model.disable_adapter():
                yield model
        return base()
    return None


@torch.no_grad()
def eval_sft(model, tokenizer, template: str, cfg) -> dict:
    rows, _, _ = load_sft_rows(cfg.data, "auto", tokenizer, template, cfg.max_length, use_cache=False,
                               on_bad_row="skip", rendering=Rendering.of(cfg))
    nll, tokens = 0.0, 0.0
    for row in rows:
        sums, counts = unit_sequence_logps(model, single(row), 1)
        nll -= sums.item()
        tokens += counts.item()
    loss = nll / max(tokens, 1)
    return {"rows": len(rows), "tokens": int(tokens), "loss": loss, "perplexity": math.exp(min(loss, 50))}


@torch.no_grad()
def eval_preferences(model, tokenizer, template: str, cfg) -> dict:
    pairs, _ = tokenize_preferences(tokenizer, template, read_rows(cfg.data), cfg.max_length, "skip",
                                    Rendering.of(cfg))
    if not pairs:
        raise UserError("no preference pairs to evaluate")
    pad = tokenizer.pad_token_id
    chosen, rejected = [], []
    for pair in pairs:
        c, r = pair_logps(model, [pair], "prefix_shared", pad, "cpu")[:2]
        chosen.append(c.item())
        rejected.append(r.item())
    result = {"pairs": len(pairs),
              "logp_accuracy": sum(c > r for c, r in zip(chosen, rejected, strict=True)) / len(pairs),
              "logp_margin": sum(c - r for c, r in zip(chosen, rejected, strict=True)) / len(pairs)}
    reference = reference_of(model, cfg.ref_model)
    if reference is not None:
        with reference as ref:
            ref_pairs = [pair_logps(ref, [p], "prefix_shared", pad, "cpu")[:2] for p in pairs]
        rewards = [(cfg.beta * (c - rc.item()), cfg.beta * (r - rr.item()))
                   for c, r, (rc, rr) in zip(chosen, rejected, ref_pairs, strict=True)]
        result["reward_accuracy"] = sum(a > b for a, b in rewards) / len(pairs)
        result["reward_margin"] = sum(a - b for a, b in rewards) / len(pairs)
    return result


def eval_prompts(model, tokenizer, cfg) -> dict:
    prompts = read_prompts(cfg.prompts)
    reward = load_reward(cfg.reward)

    def scored(m, tok):
        samples = generate(m, tok, prompts, n=cfg.n or 2, max_new_tokens=cfg.max_new_tokens or 64, seed=cfg.seed,
                           temperature=1.0 if cfg.temperature is None else cfg.temperature, desc="sampling")
        texts = [[s.text for s in group] for group in samples]
        values = [reward([p] * len(t), t) for p, t in zip(prompts, texts, strict=True)]
        return samples, values

    samples, values = scored(model, tokenizer)
    flat = [v for group in values for v in group]
    result = {"prompts": len(prompts), "samples": len(flat), "mean_reward": sum(flat) / len(flat)}
    reference = reference_of(model, cfg.ref_model)
    if reference is not None:
        own = [s for group in samples for s in group]
        policy = completion_logps(model, own, tokenizer.pad_token_id)
        with reference as ref:
            result["kl_to_reference"] = sequence_kl(policy, completion_logps(ref, own, tokenizer.pad_token_id))
    if cfg.baseline:
        base_model, base_tokenizer = load_for_eval(cfg.baseline)
        base_samples, base_values = scored(base_model, base_tokenizer)
        if cfg.judge:
            judge_model, judge_tokenizer = load_for_eval(cfg.judge)
            questions = [p if isinstance(p, str) else p[-1]["content"] for p in prompts]
            outcomes = judge(model_preference(judge_model, judge_tokenizer), questions,
                             [g[0].text for g in samples], [g[0].text for g in base_samples])
            result["judge"] = summarize(outcomes)
        outcomes = [1.0 if a > b else 0.5 if a == b else 0.0
                    for ga, gb in zip(values, base_values, strict=True) for a, b in zip(ga, gb, strict=True)]
        result["win_rate"] = sum(outcomes) / len(outcomes)
        result["baseline_mean_reward"] = sum(v for g in base_values for v in g) / len(outcomes)
    return result


def ability_sets(entries: list[str]) -> dict[str, str]:
    """`NAME=FILE` or `FILE` (named after the file) → {name: file}."""
    sets = {}
    for entry in entries:
        name, sep, path = entry.partition("=")
        name, path = (name, path) if sep else (Path(entry).stem, entry)
        if name in sets:
            raise UserError(f"abilities: two evaluation sets are named '{name}' (write NAME=FILE)")
        sets[name] = path
    return sets


BENCHMARKS = ("humaneval", "mt-bench")


def eval_benchmark(model, tokenizer, cfg) -> dict:
    if cfg.benchmark not in BENCHMARKS:
        raise UserError(f"'benchmark' must be one of {', '.join(BENCHMARKS)}, got {cfg.benchmark!r}")
    if cfg.limit is not None and cfg.limit <= 0:
        raise UserError(f"'limit' must be > 0, got {cfg.limit}")
    samples = Path(cfg.samples or f"{cfg.benchmark}-samples.jsonl")
    run_one = eval_humaneval if cfg.benchmark == "humaneval" else eval_mtbench
    result = run_one(model, tokenizer, cfg, samples)
    result["samples_file"] = str(samples)
    return result


def eval_humaneval(model, tokenizer, cfg, samples: Path) -> dict:
    from alignkit.eval import humaneval

    problems = humaneval.load_problems(cfg.benchmark_data, cfg.limit)
    return humaneval.evaluate(model, tokenizer, problems, n=cfg.n or 1, temperature=cfg.temperature or 0.0,
                              max_new_tokens=cfg.max_new_tokens or 512, seed=cfg.seed, samples_file=samples,
                              prompt_format=cfg.prompt_format,
                              autocast=mixed_precision("auto") == "bf16")  # bf16 where the CPU computes it


def eval_mtbench(model, tokenizer, cfg, samples: Path) -> dict:
    from alignkit.eval import mtbench

    if not cfg.judge:
        raise UserError("--benchmark mt-bench needs --judge M: the local model that grades the answers (it may be "
                        "--model itself)")
    if cfg.n not in (None, 1):
        raise UserError(f"--benchmark mt-bench answers each question once; got --n {cfg.n}")
    bench = mtbench.load_bench(cfg.benchmark_data, cfg.limit)  # every file checked before any model answers
    def loaded(spec: str):
        return (model, tokenizer) if spec == cfg.model else load_for_eval(spec)

    judge = loaded(cfg.judge)
    baseline = loaded(cfg.baseline) if cfg.baseline else None
    return mtbench.evaluate(model, tokenizer, bench, judge, cfg.judge, baseline,
                            max_new_tokens=cfg.max_new_tokens or 1024, judge_max_new_tokens=cfg.judge_max_new_tokens,
                            temperature=cfg.temperature or 0.0, seed=cfg.seed, answers_file=samples)


def print_section(name: str, values: dict, indent: str = "") -> None:
    """`name:` then one line per value; a mapping of plain values on one line, a deeper one as a section."""
    print(f"{indent}{name}:")
    for key, value in values.items():
        if isinstance(value, dict) and any(isinstance(v, dict) for v in value.values()):
            print_section(key, value, indent + "  ")
        else:
            print(f"{indent}  {key:<22}{shown(value)}")


def shown(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, list) and value and all(isinstance(v, float) for v in value):
        return "[" + ", ".join(f"{v:.4f}" for v in value) + "]"
    if isinstance(value, dict):
        return "  ".join(f"{k} {shown(v)}" for k, v in value.items())
    return str(value)


def run(cfg) -> dict:
    if not cfg.data and not cfg.prompts and not cfg.abilities and not cfg.benchmark:
        raise UserError("give --data (SFT or preference rows), --prompts with --reward, --abilities or --benchmark")
    model, tokenizer = load_for_eval(cfg.model)
    template = resolve_template(tokenizer, cfg.chat_template)
    results: dict = {"model": cfg.model}
    if cfg.data:
        first = read_rows(cfg.data[:1])[0].fields
        is_prefs = "chosen" in first and "rejected" in first
        results["preferences" if is_prefs else "sft"] = (eval_preferences if is_prefs else eval_sft)(
            model, tokenizer, template, cfg)
    if cfg.judge and not (cfg.prompts and cfg.baseline) and cfg.benchmark != "mt-bench":
        raise UserError("--judge compares against --baseline on --prompts (give all three) or grades "
                        "--benchmark mt-bench")
    if cfg.prompts:
        results["sampled"] = eval_prompts(model, tokenizer, cfg)
    if cfg.abilities:
        scored = evaluate_sets(model, tokenizer, ability_sets(cfg.abilities), cfg.max_new_tokens or 64)
        results["abilities"] = {name: r["score"] for name, r in scored.items()}
    if cfg.benchmark:
        results[cfg.benchmark] = eval_benchmark(model, tokenizer, cfg)
    for section, values in results.items():
        if isinstance(values, dict):
            print_section(section, values)
    if cfg.output:
        Path(cfg.output).write_text(json.dumps(results, indent=1))
    return results
