"""`alignkit chat`: talk to a model in the terminal; each reply is streamed and kept in the history."""

from __future__ import annotations

import sys

import torch

from alignkit.generation import stream
from alignkit.models.load import load_model, load_tokenizer, resolve_model


def run(cfg) -> list[dict]:
    path = resolve_model(cfg.model)
    tokenizer = load_tokenizer(path)
    model = load_model(path).eval()
    torch.manual_seed(cfg.seed)
    start = [{"role": "system", "content": cfg.system}] if cfg.system else []
    messages = list(start)
    print("alignkit chat: /reset forgets the conversation, /exit or Ctrl-D leaves", file=sys.stderr)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print(file=sys.stderr)
            return messages
        if line in ("/exit", "/quit"):
            return messages
        if line == "/reset":
            messages = list(start)
            continue
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        print("model> ", end="", flush=True)
        answer = stream(model, tokenizer, messages, cfg.max_new_tokens, cfg.temperature, cfg.top_p)
        messages.append({"role": "assistant", "content": answer})
