"""Reward functions for preference data and evaluation: (prompts, completions) → one float each.

- `sentiment`: VADER's compound score of the completion, in [−1, 1] (Hutto & Gilbert 2014; the DPO paper's
  controlled-sentiment task used a sentiment classifier the same way);
- `module:function`: any importable Python callable taking (prompt, completion) and returning a float;
- a local Hugging Face sequence-classification folder: the probability of its positive label (the label named
  positive, else the last one), or its logit when it has a single output;
- `judge:MODEL`: a local causal LM comparing the completions of one prompt with one another, each match in both
  orders (`alignkit.eval.judge.group_scores`): a completion's score is its mean result, win 1, tie ½, loss 0.
  Rewards are called with the completions of one prompt at a time.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

from alignkit.errors import UserError

Reward = Callable[[list[str], list[str]], list[float]]


def sentiment_reward() -> Reward:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()
    return lambda prompts, completions: [analyzer.polarity_scores(c)["compound"] for c in completions]


def callable_reward(spec: str) -> Reward:
    module_name, _, function_name = spec.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as err:
        raise UserError(f"reward '{spec}': cannot import it ({err})") from None
    if not callable(function):
        raise UserError(f"reward '{spec}': is not callable")
    return lambda prompts, completions: [float(function(p, c)) for p, c in zip(prompts, completions, strict=True)]


def classifier_reward(folder: Path, batch_size: int = 16) -> Reward:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    except (OSError, ValueError) as err:
        raise UserError(f"reward '{folder}': not a sequence-classification model ({err})") from None
    labels = {str(v).lower(): int(k) for k, v in (model.config.id2label or {}).items()}
    positive = labels.get("positive", labels.get("pos", model.config.num_labels - 1))

    @torch.no_grad()
    def score(prompts: list[str], completions: list[str]) -> list[float]:
        values = []
        for start in range(0, len(completions), batch_size):
            batch = tokenizer(completions[start:start + batch_size], return_tensors="pt", padding=True,
                              truncation=True)
            logits = model(**batch).logits.float()
            if logits.shape[-1] == 1:
                values += logits[:, 0].tolist()
            else:
                values += logits.softmax(-1)[:, positive].tolist()
        return values

    return score


def judge_reward(spec: str) -> Reward:
    from alignkit.eval.judge import group_scores, model_preference
    from alignkit.models.load import load_model, load_tokenizer, resolve_model

    path = resolve_model(spec)
    prefer = model_preference(load_model(path).eval(), load_tokenizer(path))

    def score(prompts: list[str], completions: list[str]) -> list[float]:
        if len(set(prompts)) > 1:
            raise ValueError("a judge reward scores the completions of one prompt at a time")
        return group_scores(prefer, prompts[0], completions) if completions else []

    return score


def load_reward(spec: str) -> Reward:
    if spec == "sentiment":
        return sentiment_reward()
    if spec.startswith("judge:"):
        return judge_reward(spec.removeprefix("judge:"))
    if Path(spec).is_dir():
        return classifier_reward(Path(spec))
    if ":" in spec:
        return callable_reward(spec)
    raise UserError(f"reward '{spec}': use sentiment, module:function, a sequence-classification model folder "
                    "or judge:MODEL")
