"""Does llama.cpp run alignkit's GGUF export as transformers runs the model? (needs `pip install llama-cpp-python`)

    PYTHONPATH=. python bench/llama_cpp_gguf.py [--model smollm2-135m-instruct] [--quant f16] [--tokens 32]

Exports the model with `alignkit export --format gguf`, then for each prompt (rendered with the chat template)
compares llama.cpp's tokenisation and greedy continuation with transformers' greedy continuation of the same
ids, from the fp32 model and from the GGUF file as transformers reads it back (the f16 weights llama.cpp runs).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

PROMPTS = ["What is the capital of France?", "Write a Python function that reverses a string.",
           "Give three tips for staying healthy.", "Translate 'good morning' into Spanish.",
           "What is 12 times 7?"]


def transformers_greedy(model, ids: list[int], tokens: int, stops: list[int]) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=tokens, do_sample=False, eos_token_id=stops,
                             pad_token_id=stops[0])
    return out[0, len(ids):].tolist()


def llama_cpp_greedy(llm, ids: list[int], tokens: int, stops: list[int]) -> list[int]:
    got: list[int] = []
    llm.reset()
    for token in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
        got.append(token)
        if token in stops or len(got) == tokens:
            break
    return got


def main() -> int:
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM

    from alignkit.cli import main as alignkit
    from alignkit.generation import render_prompt, stop_ids
    from alignkit.models.load import load_tokenizer, resolve_model

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--quant", default="f16", choices=["f16", "q8_0"])
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    source = resolve_model(args.model)
    tokenizer = load_tokenizer(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    stops = stop_ids(model, tokenizer)
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "gguf"
        assert alignkit(["export", str(source), "--output", str(out), "--format", "gguf", "--quant", args.quant]) == 0
        path = out / f"model-{args.quant}.gguf"
        back = AutoModelForCausalLM.from_pretrained(out, gguf_file=path.name, dtype=torch.float32).eval()
        llm = Llama(model_path=str(path), n_ctx=512, n_threads=1, verbose=False)
        same_tokens = same_fp32 = same_gguf = 0
        for prompt in PROMPTS:
            text = render_prompt(tokenizer, prompt)
            ids = tokenizer(text, add_special_tokens=False).input_ids
            same_tokens += llm.tokenize(text.encode(), add_bos=False, special=True) == ids
            ours = llama_cpp_greedy(llm, ids, args.tokens, stops)
            fp32 = transformers_greedy(model, ids, args.tokens, stops)
            f16 = transformers_greedy(back, ids, args.tokens, stops)
            same_fp32 += ours == fp32
            same_gguf += ours == f16
            print(f"{prompt!r}: llama.cpp {'==' if ours == f16 else '!='} transformers(GGUF), "
                  f"{'==' if ours == fp32 else '!='} transformers(fp32): {tokenizer.decode(ours)!r}")
    n = len(PROMPTS)
    print(f"{args.model} {args.quant}, {args.tokens} greedy tokens: tokenisation equal {same_tokens}/{n}, "
          f"continuation equal to transformers on the GGUF weights {same_gguf}/{n}, on the fp32 model {same_fp32}/{n}")
    return 0 if same_gguf == n and same_tokens == n else 1


if __name__ == "__main__":
    sys.exit(main())
