"""Batched sampling from a causal LM with its chat template, keeping the token ids for later scoring."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm


@dataclass
class Sample:
    prompt_index: int
    text: str  # the completion, special tokens removed
    prompt_ids: list[int]
    completion_ids: list[int]  # up to and including the first end-of-turn token, if one was generated


def render_prompt(tokenizer, prompt) -> str:
    """A prompt (text, a message list, or {messages, tools} for a model that may call tools) as the model sees
    it, ending with the assistant's turn header."""
    tools = None
    if isinstance(prompt, dict):
        prompt, tools = prompt["messages"], prompt.get("tools")
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)


def stop_ids(model, tokenizer) -> list[int]:
    """The model's configured eos ids, the tokenizer's eos and the end-of-turn token its chat template uses
    (a model trained on a template chosen for it, e.g. Gemma's <end_of_turn>, has no such entry in its config)."""
    from alignkit.data.templates import end_of_turn_ids

    configured = model.generation_config.eos_token_id
    ids = list(configured) if isinstance(configured, list) else [configured] if configured is not None else []
    for token in [tokenizer.eos_token_id, *end_of_turn_ids(tokenizer)]:
        if token is not None and token not in ids:
            ids.append(token)
    return ids


class CategoricalDraw:
    """A logits processor that draws each row's next token from softmax(scores / temperature), kept to the
    top-p nucleus (the most probable tokens whose mass reaches top_p, as transformers' TopPLogitsWarper keeps
    them), and returns scores that are 0 at the drawn token and -inf elsewhere, so that greedy decoding emits
    the draw.

    The draw is inverse transform sampling: one uniform number per row, placed in the cumulative
    probabilities. Sampling in generate() itself calls torch.multinomial, which on CPU draws an exponential
    number for every vocabulary entry of every row at every step, a cost that grows with the vocabulary and
    not with the model. Same distribution, other random numbers; a generation config's min_p, typical_p and
    epsilon cut-offs are warpers of sampling mode and do not apply."""

    def __init__(self, temperature: float, top_p: float):
        self.temperature, self.top_p = temperature, top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            probs, order = probs.sort(dim=-1, descending=True)
            outside = probs.cumsum(dim=-1) - probs >= self.top_p  # the more probable tokens hold top_p already
            outside[:, 0] = False  # the most probable token stays, whatever top_p
            probs = probs.masked_fill(outside, 0.0)
        cumulative = probs.cumsum(dim=-1)
        targets = torch.rand(len(probs), 1, device=probs.device) * cumulative[:, -1:]
        drawn = torch.searchsorted(cumulative, targets, right=True).clamp_(max=probs.shape[-1] - 1)
        if self.top_p < 1.0:
            drawn = order.gather(-1, drawn)
        return torch.full_like(scores, float("-inf")).scatter_(-1, drawn, 0.0)


def decoding(temperature: float, top_p: float) -> dict:
    """generate() keyword arguments: sampling at `temperature` and `top_p` as greedy decoding over
    `CategoricalDraw`'s draws, or plain greedy decoding when temperature is 0."""
    if temperature > 0:
        from transformers import LogitsProcessorList

        return {"do_sample": False, "logits_processor": LogitsProcessorList([CategoricalDraw(temperature, top_p)])}
    return {"do_sample": False}


def stopping(tokenizer, stop_strings: list[str] | None) -> dict:
    return {"stop_strings": stop_strings, "tokenizer": tokenizer} if stop_strings else {}


@torch.no_grad()
def stream(model, tokenizer, messages: list[dict], max_new_tokens: int, temperature: float, top_p: float) -> str:
    """One reply to a conversation, printed token by token as it is generated; returns its text."""
    from transformers import TextStreamer

    inputs = tokenizer(render_prompt(tokenizer, messages), return_tensors="pt", add_special_tokens=False)
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, eos_token_id=stop_ids(model, tokenizer),
                            pad_token_id=tokenizer.pad_token_id,
                            streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True),
                            **decoding(temperature, top_p))
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


@torch.no_grad()
def generate(model, tokenizer, prompts: list, n: int = 1, max_new_tokens: int = 48, temperature: float = 1.0,
             top_p: float = 1.0, batch_size: int = 16, seed: int = 0, autocast: bool = False,
             desc: str = "generating", show_progress: bool = True, chat: bool = True,
             stop_strings: list[str] | None = None) -> list[list[Sample]]:
    """n samples per prompt (greedy when temperature is 0). Prompts are left-padded and batched; `chat`: with
    the chat template, else the prompt text as it is; a sample also ends at any of `stop_strings` (which its
    text still holds)."""
    torch.manual_seed(seed)
    model.eval()
    device = next(model.parameters()).device
    stops = stop_ids(model, tokenizer)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    results: list[list[Sample]] = [[] for _ in prompts]
    bar = tqdm(total=len(prompts) * n, desc=desc, unit="sample", disable=not show_progress, dynamic_ncols=True)
    precision = torch.autocast(device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    try:
        for start in range(0, len(prompts), batch_size):
            texts = [render_prompt(tokenizer, p) if chat else p for p in prompts[start:start + batch_size]]
            inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            repeated = {k: v.repeat_interleave(n, dim=0) for k, v in inputs.items()}  # as num_return_sequences
            with precision:
                output = model.generate(**repeated, max_new_tokens=max_new_tokens, eos_token_id=stops,
                                        pad_token_id=tokenizer.pad_token_id, **decoding(temperature, top_p),
                                        **stopping(tokenizer, stop_strings))
            width = inputs["input_ids"].shape[1]
            for row, sequence in enumerate(output):
                prompt_row = row // n
                mask = inputs["attention_mask"][prompt_row].bool()
                prompt_ids = inputs["input_ids"][prompt_row][mask].tolist()
                completion = sequence[width:].tolist()
                end = next((i for i, t in enumerate(completion) if t in stops), None)
                completion = completion[:end + 1] if end is not None else completion
                text = tokenizer.decode(completion, skip_special_tokens=True)
                results[start + prompt_row].append(Sample(start + prompt_row, text, prompt_ids, completion))
            bar.update(len(output))
    finally:
        tokenizer.padding_side = side
        bar.close()
    return results
