"""`alignkit chat`: talk to a model in the terminal; each reply is streamed and kept in the history."""

from __future__ import annotations

import sys

import torch

from alignkit.generation import stop_ids
from alignkit.models.load import load_model, load_tokenizer, resolve_model


def reply(model, tokenizer, messages: list[dict], cfg) -> str:
    from transformers import TextStreamer

    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    sampling = {"do_sample": True, "temperature": cfg.temperature, "top_p": cfg.top_p} if cfg.temperature > 0 else \
        {"do_sample": False}
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=cfg.max_new_tokens, eos_token_id=stop_ids(model, tokenizer),
                                pad_token_id=tokenizer.pad_token_id,
                                streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True),
                                **sampling)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


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
        messages.append({"role": "assistant", "content": reply(model, tokenizer, messages, cfg)})
