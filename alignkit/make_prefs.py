"""Preference data from samples and a reward, as in the DPO paper §6.1: sample n completions per prompt from a
model, score each, and pair a preferred with a dispreferred one.

Pairing: `best-worst` makes one pair per prompt, the highest against the lowest reward, when they differ by
more than `margin`; `all` makes every pair whose rewards differ by more than `margin`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from alignkit.data.sources import read_rows
from alignkit.errors import UserError
from alignkit.generation import Sample, generate
from alignkit.rewards import Reward


@dataclass
class PrefsStats:
    prompts: int
    samples: int
    pairs: int
    skipped_prompts: int  # prompts whose samples were all within the margin
    mean_reward: float


def read_prompts(path: str, tools: bool = False) -> list:
    """Each row's `prompt`; with `tools`, a row that has `tools` gives {messages, tools} as the chat template
    takes them (see `alignkit.data.tool_calls`)."""
    prompts = []
    for row in read_rows([path]):
        prompt = row.fields.get("prompt")
        if not isinstance(prompt, (str, list)) or not prompt:
            raise UserError(f"{row.origin}: field 'prompt' must be text or a list of messages")
        prompts.append(tool_prompt(row, prompt) if tools and row.fields.get("tools") else prompt)
    return prompts


def tool_prompt(row, prompt) -> dict:
    from alignkit.data.formats import Message, _message_list, row_tools

    messages = [Message("user", prompt)] if isinstance(prompt, str) else _message_list(row, "prompt", prompt)
    return {"messages": [m.template_dict() for m in messages], "tools": row_tools(row)}


def pair_up(prompt, completions: list[str], rewards: list[float], pairing: str = "best-worst",
            margin: float = 0.0) -> list[dict]:
    """Preference rows for one prompt from its scored completions. An empty completion (the model ended its turn
    at once) is left out: a preference row needs text on both sides."""
    scored = sorted(((r, c) for r, c in zip(rewards, completions, strict=True) if c.strip()), key=lambda rc: -rc[0])
    if pairing == "best-worst":
        candidates = [(scored[0], scored[-1])] if len(scored) > 1 else []
    elif pairing == "all":
        candidates = [(a, b) for i, a in enumerate(scored) for b in scored[i + 1:]]
    else:
        raise UserError(f"pairs: use best-worst or all, got {pairing!r}")
    return [{"prompt": prompt, "chosen": best[1], "rejected": worst[1], "chosen_reward": best[0],
             "rejected_reward": worst[0]}
            for best, worst in candidates if best[0] - worst[0] > margin and best[1] != worst[1]]


def make_preferences(model, tokenizer, prompts: list, reward: Reward, n: int = 4, pairing: str = "best-worst",
                     margin: float = 0.0, max_new_tokens: int = 48, temperature: float = 1.0, top_p: float = 1.0,
                     batch_size: int = 16, seed: int = 0, autocast: bool = False) -> tuple[list[dict], PrefsStats]:
    samples = sample_completions(model, tokenizer, prompts, n, max_new_tokens, temperature, top_p, batch_size, seed,
                                 autocast)
    rewards = score_samples(prompts, samples, reward)
    return pair_samples(prompts, samples, rewards, pairing, margin)


def sample_completions(model, tokenizer, prompts: list, n: int = 4, max_new_tokens: int = 48,
                       temperature: float = 1.0, top_p: float = 1.0, batch_size: int = 16, seed: int = 0,
                       autocast: bool = False, show_progress: bool = True) -> list[list[Sample]]:
    """n completions per prompt, the prompts batched (see `alignkit.generation.generate`)."""
    if n < 2:
        raise UserError(f"n must be at least 2 to form pairs, got {n}")
    return generate(model, tokenizer, prompts, n=n, max_new_tokens=max_new_tokens, temperature=temperature,
                    top_p=top_p, batch_size=batch_size, seed=seed, autocast=autocast, desc="sampling",
                    show_progress=show_progress)


def score_samples(prompts: list, samples: list[list[Sample]], reward: Reward) -> list[list[float]]:
    """Each prompt's completions scored together (a judge compares them with one another)."""
    return [reward([prompt_text(prompt)] * len(group), [s.text for s in group])
            for prompt, group in zip(prompts, samples, strict=True)]


def pair_samples(prompts: list, samples: list[list[Sample]], rewards: list[list[float]],
                 pairing: str = "best-worst", margin: float = 0.0) -> tuple[list[dict], PrefsStats]:
    rows, skipped = [], 0
    for prompt, group, values in zip(prompts, samples, rewards, strict=True):
        pairs = pair_up(prompt, [s.text for s in group], values, pairing, margin)
        skipped += not pairs
        rows += pairs
    flat = [v for values in rewards for v in values]
    return rows, PrefsStats(len(prompts), len(flat), len(rows), skipped, sum(flat) / max(1, len(flat)))


def prompt_text(prompt) -> str:
    """What a reward reads as the prompt: the text, or the last message's content."""
    if isinstance(prompt, str):
        return prompt
    messages = prompt["messages"] if isinstance(prompt, dict) else prompt
    return messages[-1]["content"]


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)


def run(cfg) -> dict:
    """`alignkit prefs`: sample, score, pair and write the JSONL that `alignkit dpo` reads."""
    from alignkit.log import log
    from alignkit.models.load import load_model, load_tokenizer, resolve_model
    from alignkit.rewards import load_reward
    from alignkit.training.backend import mixed_precision

    if not cfg.prompts:
        raise UserError("no prompts: set --prompts FILE")
    if not cfg.output:
        raise UserError("no output: set --output FILE.jsonl")
    prompts = read_prompts(cfg.prompts)
    reward = load_reward(cfg.reward)
    path = resolve_model(cfg.model)
    tokenizer = load_tokenizer(path, cfg.trust_remote_code)
    model = load_model(path, trust_remote_code=cfg.trust_remote_code)
    autocast = cfg.dtype == "auto" and mixed_precision("auto") == "bf16"
    rows, stats = make_preferences(model, tokenizer, prompts, reward, n=cfg.n, pairing=cfg.pairs, margin=cfg.margin,
                                   max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                                   batch_size=cfg.batch_size, seed=cfg.seed, autocast=autocast)
    write_jsonl(rows, Path(cfg.output))
    log(f"{stats.pairs} pairs from {stats.prompts} prompts x {cfg.n} samples (mean reward {stats.mean_reward:.3f}, "
        f"{stats.skipped_prompts} prompts without a spread above {cfg.margin}); written to {cfg.output}")
    return {"pairs": stats.pairs, "prompts": stats.prompts, "samples": stats.samples,
            "skipped_prompts": stats.skipped_prompts, "mean_reward": stats.mean_reward, "output": cfg.output}
