"""Synthetic, seeded data for the DMT experiment: three abilities, each with training rows and scored eval rows.

- math: multi-step arithmetic word problems; the completion works through the steps and ends "The answer is N."
  Eval rows carry `answer` (exact match of the final number).
- code: small Python functions; the completion is the function in a ```python block. Eval rows carry `tests`
  (assert statements run against the reply).
- general: instructions with checkable constraints (capitals, bullet counts, word limits, no commas, a required
  word, JSON); eval rows carry `checks`.
Math and code training and eval rows come from the same families; a stable hash of the prompt puts one prompt in
five in evaluation only, so the scores measure what the training taught, not what it memorised. General eval rows
ask for the same six kinds of constraint in phrasings training never uses, the kinds in turn.

    python experiments/dmt_data.py     # writes examples/data/dmt/{math,code,general}.jsonl and eval_*.jsonl
"""

from __future__ import annotations

import json
import random
import zlib
from pathlib import Path

NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jia", "Kofi", "Lena", "Mo", "Nora"]
ITEMS = ["apples", "books", "coins", "marbles", "pencils", "stickers", "cookies", "shells", "cards", "stamps"]


# ---------------------------------------------------------------- math

def math_row(rng: random.Random) -> dict:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    start, bags, per_bag = rng.randint(2, 15), rng.randint(2, 4), rng.randint(2, 5)
    bought = bags * per_bag
    kind = rng.randrange(3)
    if kind == 0:
        given = rng.randint(1, start + bought - 1)
        prompt = (f"{name} has {start} {item}. {name} buys {bags} boxes with {per_bag} {item} each, then gives "
                  f"{given} {item} away. How many {item} does {name} have now?")
        answer = start + bought - given
        steps = [f"{name} buys {bags} × {per_bag} = {bought} {item}.", f"{start} + {bought} = {start + bought}.",
                 f"After giving {given} away: {start + bought} - {given} = {answer}."]
    elif kind == 1:
        friends = rng.randint(2, 4)
        total = friends * rng.randint(2, 6)
        prompt = (f"{name} shares {total} {item} equally among {friends} friends and then finds {start} more. "
                  f"How many {item} does each friend get, plus the {start} found?")
        answer = total // friends + start
        steps = [f"Each friend gets {total} ÷ {friends} = {total // friends} {item}.",
                 f"{total // friends} + {start} = {answer}."]
    else:
        price = rng.randint(2, 5)
        prompt = (f"{name} buys {bags} packs of {item} at {price} dollars each and pays with {bags * price + start} "
                  f"dollars. How much change does {name} get?")
        answer = start
        steps = [f"The packs cost {bags} × {price} = {bags * price} dollars.",
                 f"Change: {bags * price + start} - {bags * price} = {answer}."]
    return {"prompt": prompt, "completion": " ".join(steps) + f" The answer is {answer}.", "answer": answer}


# ---------------------------------------------------------------- code

def _add(rng):
    n = rng.randint(2, 50)
    return f"returns x plus {n}", "x", f"x + {n}", [(v, v + n) for v in (0, 3, -5)]


def _times(rng):
    n = rng.randint(2, 12)
    return f"returns x multiplied by {n}", "x", f"x * {n}", [(v, v * n) for v in (0, 2, -3)]


def _last(rng):
    return "returns the last element of the list xs", "xs", "xs[-1]", [([1, 2, 3], 3), (["a"], "a")]


def _count(rng):
    letter = rng.choice("aeiost")
    return (f"returns how many times the letter '{letter}' appears in the string s", "s", f"s.count({letter!r})",
            [(letter * 2 + "xy" + letter, 3), ("zzz", 0)])


def _evens(rng):
    return ("returns the even numbers of the list xs, in order", "xs", "[x for x in xs if x % 2 == 0]",
            [([1, 2, 3, 4], [2, 4]), ([5, 7], [])])


def _squares(rng):
    return ("returns the squares of the numbers in the list xs", "xs", "[x * x for x in xs]",
            [([1, 2, 3], [1, 4, 9]), ([], [])])


def _reverse(rng):
    return "returns the string s reversed", "s", "s[::-1]", [("abc", "cba"), ("", "")]


def _above(rng):
    n = rng.randint(1, 20)
    return (f"returns how many numbers in the list xs are greater than {n}", "xs", f"sum(1 for x in xs if x > {n})",
            [([n - 1, n, n + 1, n + 5], 2), ([], 0)])


CODE_FAMILIES = [_add, _times, _last, _count, _evens, _squares, _reverse, _above]
VERBS = ["get", "make", "compute", "find", "calc"]
NOUNS = ["value", "result", "answer", "output", "total", "items", "thing"]


def code_row(rng: random.Random) -> dict:
    what, arg, body, cases = rng.choice(CODE_FAMILIES)(rng)
    name = f"{rng.choice(VERBS)}_{rng.choice(NOUNS)}_{rng.randint(1, 99)}"
    prompt = f"Write a Python function `{name}({arg})` that {what}."
    completion = f"```python\ndef {name}({arg}):\n    return {body}\n```"
    tests = "\n".join(f"assert {name}({given!r}) == {expected!r}" for given, expected in cases)
    return {"prompt": prompt, "completion": completion, "tests": tests}


# ---------------------------------------------------------------- general

TOPICS = {
    "the sea": ["waves roll onto the sand", "the water is cold and blue", "boats drift far from the shore"],
    "autumn": ["leaves turn red and gold", "the air smells of rain", "days grow short and cool"],
    "a city": ["streets fill with traffic", "lights glow all night", "people hurry to work"],
    "music": ["a song can lift a tired mind", "drums keep the beat", "a quiet tune fills the room"],
    "gardens": ["tomatoes ripen in the sun", "bees visit every flower", "weeds grow after rain"],
    "winter": ["snow covers the hills", "breath turns to mist", "fires warm the house"],
    "trains": ["the train rushes past the fields", "passengers read by the window", "the whistle sounds twice"],
}


def general_row(rng: random.Random) -> dict:
    topic = rng.choice(list(TOPICS))
    facts = TOPICS[topic]
    kind = rng.randrange(6)
    if kind == 0:
        prompt = f"Write one sentence about {topic} in all capital letters."
        completion, checks = (rng.choice(facts).capitalize() + ".").upper(), [{"type": "uppercase"}]
    elif kind == 1:
        n = rng.randint(2, 3)
        prompt = f"List {n} facts about {topic} as bullet points."
        completion = "\n".join(f"- {fact.capitalize()}." for fact in rng.sample(facts, n))
        checks = [{"type": "bullets", "value": n}]
    elif kind == 2:
        limit = rng.randint(6, 9)
        prompt = f"Describe {topic} in at most {limit} words."
        short = [fact for fact in facts if len(fact.split()) <= limit]
        completion, checks = rng.choice(short).capitalize() + ".", [{"type": "max_words", "value": limit}]
    elif kind == 3:
        prompt = f"Write two sentences about {topic} without using any commas."
        first, second = rng.sample(facts, 2)
        completion, checks = f"{first.capitalize()}. {second.capitalize()}.", [{"type": "no_comma"},
                                                                                 {"type": "min_words", "value": 6}]
    elif kind == 4:
        word = rng.choice(["today", "always", "quietly", "again", "together"])
        prompt = f"Write a sentence about {topic} that uses the word '{word}'."
        completion, checks = f"{rng.choice(facts).capitalize()} {word}.", [{"type": "include", "value": [word]}]
    else:
        name, age = rng.choice(NAMES), rng.randint(18, 80)
        prompt = f"Reply with only a JSON object with the keys name and age for {name}, who is {age}."
        completion = json.dumps({"name": name, "age": age})
        checks = [{"type": "json"}, {"type": "include", "value": [name, str(age)]}]
    return {"prompt": prompt, "completion": completion, "checks": checks}


MAKERS = {"math": math_row, "code": code_row, "general": general_row}
SCORED = {"math": "answer", "code": "tests", "general": "checks"}


def held_out(prompt: str) -> bool:
    """One prompt in five belongs to evaluation, by a stable hash: no eval prompt is ever trained on."""
    return zlib.crc32(prompt.encode()) % 5 == 0


def make_split(ability: str, rows: int, seed: int, train: bool) -> list[dict]:
    """Training rows (prompt, completion) or eval rows (prompt and the field its scorer needs)."""
    rng = random.Random(f"{ability}/{seed}/{'train' if train else 'eval'}")
    made = _general_eval_rows(rng, rows) if ability == "general" and not train else []
    while len(made) < rows:
        row = MAKERS[ability](rng)
        if held_out(row["prompt"]) != train:
            made.append(row)
    keep = ("prompt", "completion") if train else ("prompt", SCORED[ability])
    return [{k: row[k] for k in keep} for row in made]


# Evaluation asks for the same kinds of constraint in words training never used, stratified by kind.
EVAL_PHRASINGS = {
    "uppercase": ["Using only capital letters, write a sentence about {topic}.",
                  "Answer in ALL CAPS: say one thing about {topic}."],
    "bullets": ["Give me {n} bullet points about {topic}.",
                "Write {n} short points on {topic}, each on its own line starting with '- '."],
    "max_words": ["In no more than {limit} words, tell me about {topic}.",
                  "Say something about {topic} using {limit} words or fewer."],
    "no_comma": ["Tell me about {topic} in two sentences, and do not use a single comma.",
                 "Write two sentences on {topic}; commas are not allowed."],
    "include": ["Say something about {topic} and include the word '{word}'.",
                "Write one sentence on {topic} containing the word '{word}'."],
    "json": ["Describe {name}, aged {age}, as a JSON object with keys name and age. Output only the JSON.",
             "Output a JSON object for a person named {name} who is {age} years old (keys: name, age)."],
}


def _general_eval_row(rng: random.Random, kind: str) -> dict:
    values = {"topic": rng.choice(list(TOPICS)), "n": rng.randint(2, 3), "limit": rng.randint(6, 9),
              "word": rng.choice(["today", "always", "quietly", "again", "together"]), "name": rng.choice(NAMES),
              "age": rng.randint(18, 80)}
    checks = {"uppercase": [{"type": "uppercase"}], "bullets": [{"type": "bullets", "value": values["n"]}],
              "max_words": [{"type": "max_words", "value": values["limit"]}],
              "no_comma": [{"type": "no_comma"}, {"type": "min_words", "value": 6}],
              "include": [{"type": "include", "value": [values["word"]]}],
              "json": [{"type": "json"}, {"type": "include", "value": [values["name"], str(values["age"])]}]}[kind]
    return {"prompt": rng.choice(EVAL_PHRASINGS[kind]).format(**values), "checks": checks}


def _general_eval_rows(rng: random.Random, rows: int) -> list[dict]:
    """Held-out general rows: each kind of constraint in turn, each prompt once."""
    made: list[dict] = []
    seen: set[str] = set()
    for _ in range(100 * rows):
        if len(made) == rows:
            break
        row = _general_eval_row(rng, sorted(EVAL_PHRASINGS)[len(made) % len(EVAL_PHRASINGS)])
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            made.append(row)
    return made


def write_all(folder: Path, train_rows: int, eval_rows: int, seed: int) -> dict[str, Path]:
    """{math, code, general, eval_math, ...: path} under folder."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for ability in MAKERS:
        for name, rows, train in ((ability, train_rows, True), (f"eval_{ability}", eval_rows, False)):
            paths[name] = folder / f"{name}.jsonl"
            text = "\n".join(json.dumps(row) for row in make_split(ability, rows, seed, train)) + "\n"
            # rewritten only when it changes: an unchanged file keeps the caches and saved scores that name it
            if not paths[name].is_file() or paths[name].read_text(encoding="utf-8") != text:
                paths[name].write_text(text, encoding="utf-8")
    return paths


if __name__ == "__main__":
    write_all(Path(__file__).resolve().parent.parent / "examples" / "data" / "dmt", 200, 30, seed=0)
