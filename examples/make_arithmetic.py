"""Writes examples/data/arithmetic.jsonl (SFT rows) and arithmetic_prefs.jsonl (DPO pairs).

SFT rows answer two-number sums in a fixed format; each preference pair prefers the right sum over a wrong one.

    python examples/make_arithmetic.py
"""

import json
import random
from pathlib import Path

PHRASINGS = ["What is {a} + {b}?", "Add {a} and {b}.", "Compute {a} plus {b}.", "{a} + {b} = ?"]


def answer(a: int, b: int, total: int) -> str:
    return f"{a} + {b} = {total}.\nAnswer: {total}"


def main(rows: int = 64, seed: int = 0) -> None:
    rng = random.Random(seed)
    folder = Path(__file__).parent / "data"
    folder.mkdir(exist_ok=True)
    with (folder / "arithmetic.jsonl").open("w") as sft, (folder / "arithmetic_prefs.jsonl").open("w") as prefs:
        for _ in range(rows):
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            prompt = rng.choice(PHRASINGS).format(a=a, b=b)
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer(a, b, a + b)}]
            sft.write(json.dumps({"messages": messages}) + "\n")
            wrong = a + b + rng.choice([-10, -2, -1, 1, 2, 10])
            pair = {"prompt": prompt, "chosen": answer(a, b, a + b), "rejected": answer(a, b, wrong)}
            prefs.write(json.dumps(pair) + "\n")


if __name__ == "__main__":
    main()
