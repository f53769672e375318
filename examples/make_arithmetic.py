"""Writes examples/data/arithmetic.jsonl: two-number sums answered in a fixed format (a skill to teach by SFT).

    python examples/make_arithmetic.py
"""

import json
import random
from pathlib import Path

PHRASINGS = ["What is {a} + {b}?", "Add {a} and {b}.", "Compute {a} plus {b}.", "{a} + {b} = ?"]


def main(rows: int = 64, seed: int = 0) -> None:
    rng = random.Random(seed)
    out = Path(__file__).parent / "data" / "arithmetic.jsonl"
    out.parent.mkdir(exist_ok=True)
    with out.open("w") as handle:
        for _ in range(rows):
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            prompt = rng.choice(PHRASINGS).format(a=a, b=b)
            answer = f"{a} + {b} = {a + b}.\nAnswer: {a + b}"
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
            handle.write(json.dumps({"messages": messages}) + "\n")


if __name__ == "__main__":
    main()
