"""`alignkit generate`: sample completions with the model's chat template; one prompt is streamed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from alignkit.errors import UserError
from alignkit.generation import generate, stream
from alignkit.make_prefs import read_prompts, write_jsonl
from alignkit.models.load import load_model, load_tokenizer, resolve_model


def run(cfg) -> list[dict]:
    if (cfg.prompt is None) == (cfg.prompts is None):
        raise UserError("give one of --prompt TEXT or --prompts FILE")
    path = resolve_model(cfg.model)
    tokenizer = load_tokenizer(path, cfg.trust_remote_code)
    model = load_model(path, trust_remote_code=cfg.trust_remote_code).eval()
    if cfg.prompt is not None and cfg.n == 1 and cfg.output is None:
        torch.manual_seed(cfg.seed)
        completion = stream(model, tokenizer, [{"role": "user", "content": cfg.prompt}], cfg.max_new_tokens,
                            cfg.temperature, cfg.top_p)
        return [{"prompt": cfg.prompt, "completion": completion}]
    prompts = [cfg.prompt] if cfg.prompt is not None else read_prompts(cfg.prompts, tools=True)
    samples = generate(model, tokenizer, prompts, n=cfg.n, max_new_tokens=cfg.max_new_tokens,
                       temperature=cfg.temperature, top_p=cfg.top_p, batch_size=cfg.batch_size, seed=cfg.seed)
    rows = [sample_row(prompts[s.prompt_index], s.text) for group in samples for s in group]
    if cfg.output:
        write_jsonl(rows, Path(cfg.output))
    else:
        for row in rows:
            sys.stdout.write(json.dumps(row, ensure_ascii=False) + "\n")
    return rows


def sample_row(prompt, completion: str) -> dict:
    """{prompt, completion}, and the prompt's tools where it has them."""
    if isinstance(prompt, dict):
        return {"prompt": prompt["messages"], "tools": prompt["tools"], "completion": completion}
    return {"prompt": prompt, "completion": completion}
