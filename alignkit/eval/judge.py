"""Pairwise judging by a local model: which of two answers is better, asked in both orders.

The judge reads a fixed template with the question and answers "A" and "B" and we compare its next-token
log-probabilities of "A" and "B". Each pair is judged twice with the answers swapped, which cancels a judge's
preference for a position: the model wins a prompt when it is preferred in both orders, loses when the other
is preferred in both, and ties otherwise. `score` = (wins + ties/2) / n, with a 95% normal-approximation
confidence interval.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

TEMPLATE = ("Which response answers the question better?\n\nQuestion: {question}\n\nResponse A: {a}\n\n"
            "Response B: {b}\n\nAnswer with one letter, A or B.")

Prefer = Callable[[str], float]  # judge prompt → log p(A) − log p(B)


def model_preference(model, tokenizer) -> Prefer:
    """log p("A") − log p("B") for the judge's first answer token, under its chat template."""
    a_id = tokenizer.encode("A", add_special_tokens=False)[-1]
    b_id = tokenizer.encode("B", add_special_tokens=False)[-1]

    @torch.no_grad()
    def prefer(text: str) -> float:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                 add_generation_prompt=True)
        ids = tokenizer(rendered, return_tensors="pt", add_special_tokens=False)
        logps = model(**ids).logits[0, -1].float().log_softmax(-1)
        return (logps[a_id] - logps[b_id]).item()

    return prefer


def judge(prefer: Prefer, questions: list[str], ours: list[str], theirs: list[str]) -> list[str]:
    """'win', 'tie' or 'loss' for each question, from both orders."""
    outcomes = []
    for question, a, b in zip(questions, ours, theirs, strict=True):
        first = prefer(TEMPLATE.format(question=question, a=a, b=b))  # > 0: ours (shown as A) preferred
        second = -prefer(TEMPLATE.format(question=question, a=b, b=a))  # > 0: ours (shown as B) preferred
        outcomes.append("win" if first > 0 and second > 0 else "loss" if first < 0 and second < 0 else "tie")
    return outcomes


def summarize(outcomes: list[str]) -> dict:
    n = len(outcomes)
    wins, ties = outcomes.count("win"), outcomes.count("tie")
    scores = [1.0 if o == "win" else 0.5 if o == "tie" else 0.0 for o in outcomes]
    score = sum(scores) / n
    spread = math.sqrt(sum((s - score) ** 2 for s in scores) / max(n - 1, 1) / n)
    return {"n": n, "win": wins / n, "tie": ties / n, "loss": (n - wins - ties) / n, "score": score,
            "ci95": [max(0.0, score - 1.96 * spread), min(1.0, score + 1.96 * spread)]}


def group_scores(prefer: Prefer, question: str, completions: list[str]) -> list[float]:
    """Each completion's mean score (win 1, tie ½, loss 0) against every other completion of the same question,
    every match judged in both orders."""
    n = len(completions)
    points = [0.0] * n
    matches = [(i, j) for i in range(n) for j in range(i + 1, n)]
    outcomes = judge(prefer, [question] * len(matches), [completions[i] for i, _ in matches],
                     [completions[j] for _, j in matches])
    for (i, j), outcome in zip(matches, outcomes, strict=True):
        won = {"win": 1.0, "tie": 0.5, "loss": 0.0}[outcome]
        points[i] += won
        points[j] += 1.0 - won
    return [p / max(n - 1, 1) for p in points]
