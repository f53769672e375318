"""The demo's data, generated here from templates (no downloads): movie-review prompts and SFT reviews.

Provenance: every sentence below was written for alignkit; the titles are the names of well-known films, used
only as words in prompts. The SFT rows teach a format the base model lacks: two sentences of review, then a
line `Rating: N/5` that agrees with the review's sentiment (4-5 for a positive review, 1-2 for a negative one).
Half the SFT reviews are positive and half negative, so the SFT model is not pushed towards either; DPO then
moves it towards positive reviews using a sentiment reward.
"""

from __future__ import annotations

import random
import re

TITLES = [
    "Jaws", "Casablanca", "Alien", "Vertigo", "Rocky", "Amadeus", "Fargo", "Heat", "Psycho", "Titanic",
    "Gladiator", "Inception", "Up", "Frozen", "Cars", "Arrival", "Memento", "Grease", "Rocketman", "Tenet",
    "Coco", "Shrek", "Avatar", "Dune",
]
PHRASINGS = [
    "Write a two-sentence review of the movie {title}.",
    "Review the film {title} in two sentences.",
    "Give a short two-sentence review of {title}.",
    "What did you think of the movie {title}? Answer in two sentences.",
]
POSITIVE = [
    "{title} is a delight from start to finish, with warm performances and a confident, beautiful style.",
    "{title} is a gripping, wonderful film that earns every emotion it asks for.",
    "I loved {title}: the story is clever, the cast is superb, and the pacing never lets up.",
    "{title} is a joyful triumph, funny and moving in equal measure.",
]
POSITIVE_SECOND = [
    "I would happily watch it again.", "It is a genuine classic and easy to recommend.",
    "The ending is brilliant and stays with you.", "Every scene feels alive and inspired.",
]
NEGATIVE = [
    "{title} is a tedious mess, with flat performances and a clumsy, dull style.",
    "{title} is a boring, disappointing film that wastes its interesting premise.",
    "I disliked {title}: the story is predictable, the cast is wasted, and the pacing drags.",
    "{title} is a joyless failure, neither funny nor moving.",
]
NEGATIVE_SECOND = [
    "I would not watch it again.", "It is hard to recommend to anyone.",
    "The ending is weak and forgettable.", "Most scenes feel lifeless and awkward.",
]
RATING_LINE = re.compile(r"^Rating: ([1-5])/5$")


def prompts(seed: int = 0) -> tuple[list[str], list[str]]:
    """(training prompts, held-out prompts): every title × phrasing, split 2:1 by a seeded shuffle."""
    everything = [p.format(title=t) for t in TITLES for p in PHRASINGS]
    random.Random(seed).shuffle(everything)
    cut = len(everything) * 2 // 3
    return everything[:cut], everything[cut:]


def title_of(prompt: str) -> str:
    return next(t for t in sorted(TITLES, key=len, reverse=True) if t in prompt)


def review(title: str, positive: bool, rng: random.Random) -> str:
    first, second = (POSITIVE, POSITIVE_SECOND) if positive else (NEGATIVE, NEGATIVE_SECOND)
    rating = rng.choice([4, 5]) if positive else rng.choice([1, 2])
    return f"{rng.choice(first).format(title=title)} {rng.choice(second)}\nRating: {rating}/5"


def sft_rows(train_prompts: list[str], seed: int = 0) -> list[dict]:
    """One positive and one negative formatted review per training prompt."""
    rng = random.Random(seed)
    rows = []
    for prompt in train_prompts:
        for positive in (True, False):
            rows.append({"prompt": prompt, "completion": review(title_of(prompt), positive, rng)})
    return rows


def format_score(completion: str, sentiment: float) -> float:
    """1 when the completion ends with `Rating: N/5` agreeing with its sentiment, else 0.

    Agreement: N ≥ 4 for sentiment > 0.05, N ≤ 2 for sentiment < −0.05, N = 3 in between (VADER's thresholds).
    """
    lines = completion.strip().splitlines()
    match = RATING_LINE.match(lines[-1].strip()) if len(lines) >= 2 else None
    if match is None:
        return 0.0
    rating = int(match.group(1))
    if sentiment > 0.05:
        return float(rating >= 4)
    if sentiment < -0.05:
        return float(rating <= 2)
    return float(rating == 3)


def review_text(completion: str) -> str:
    """The review without its rating line (what the sentiment reward should judge)."""
    lines = completion.strip().splitlines()
    if lines and RATING_LINE.match(lines[-1].strip()):
        lines = lines[:-1]
    return "\n".join(lines)
