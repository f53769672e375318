"""Batched sampling: the categorical draw equals softmax(scores / T) within its top-p nucleus, and generate() with it
gives n reproducible samples per prompt."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM, TopPLogitsWarper

from alignkit.generation import CategoricalDraw, generate

DRAWS = 20000


def drawn_frequencies(scores: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """How often each token is drawn, per row of `scores`, over DRAWS draws."""
    draw = CategoricalDraw(temperature, top_p)
    rows = scores.repeat(DRAWS, 1)
    out = draw(None, rows)
    assert torch.isfinite(out).sum(dim=-1).eq(1).all() and out.max(dim=-1).values.eq(0).all()  # one token each
    chosen = out.argmax(dim=-1).view(DRAWS, len(scores))
    counts = torch.stack([torch.bincount(chosen[:, r], minlength=scores.shape[-1]) for r in range(len(scores))])
    return counts.double() / DRAWS


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 1.0), (1.0, 0.8), (1.3, 0.5)])
def test_the_draw_follows_the_tempered_distribution_within_the_nucleus(temperature, top_p):
    torch.manual_seed(0)
    scores = torch.randn(3, 40) * 2
    expected = torch.softmax(scores.double() / temperature, dim=-1)
    if top_p < 1:  # transformers' own nucleus: the tokens its warper leaves finite
        kept = torch.isfinite(TopPLogitsWarper(top_p)(None, scores / temperature))
        expected = expected * kept
        expected = expected / expected.sum(dim=-1, keepdim=True)
    frequencies = drawn_frequencies(scores, temperature, top_p)
    assert not (frequencies[expected == 0] > 0).any()  # nothing outside the nucleus
    # five standard errors of a frequency estimated from DRAWS draws
    bound = 5 * (expected * (1 - expected) / DRAWS).sqrt() + 1e-9
    assert ((frequencies - expected).abs() <= bound).all()


def test_the_most_probable_token_stays_and_impossible_tokens_are_never_drawn():
    scores = torch.tensor([[3.0, 1.0, 0.0, -1.0], [float("-inf"), 0.0, float("-inf"), 0.0]])
    assert (drawn_frequencies(scores, 1.0, 0.0)[0] == torch.tensor([1.0, 0, 0, 0], dtype=torch.float64)).all()
    frequencies = drawn_frequencies(scores, 1.0, 1.0)[1]
    assert frequencies[0] == frequencies[2] == 0 and abs(frequencies[1] - 0.5) < 0.02


def test_sampled_generation_gives_n_reproducible_samples_per_prompt(tiny_model_dir):
    model = LlamaForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = ["Hello", "Add 12 and 30."]

    def sample(seed: int) -> list[list[list[int]]]:
        groups = generate(model, tokenizer, prompts, n=3, max_new_tokens=8, seed=seed, show_progress=False)
        assert [len(group) for group in groups] == [3, 3]
        assert all(s.prompt_index == i for i, group in enumerate(groups) for s in group)
        return [[s.completion_ids for s in group] for group in groups]

    first = sample(0)
    assert sample(0) == first and sample(1) != first
    assert len({tuple(ids) for group in first for ids in group}) > 1  # samples, not one greedy reply repeated
    greedy = generate(model, tokenizer, prompts, n=2, max_new_tokens=8, temperature=0, show_progress=False)
    assert all(group[0].completion_ids == group[1].completion_ids for group in greedy)
