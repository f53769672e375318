"""LoRA input dropout drawn as geometric gaps: the distribution of `nn.Dropout`'s masks, eager and compiled."""

from __future__ import annotations

import math

import pytest
import torch

from alignkit.models.load import add_lora
from alignkit.models.lora_dropout import GapDropout
from tests.conftest import build_model, build_tokenizer


def masks(dropout, shape, times: int) -> torch.Tensor:
    """`times` masks (True where dropped) of an all-ones input, checking kept elements are scaled by 1/(1 − p)."""
    ones = torch.ones(shape)
    out = torch.stack([dropout(ones) for _ in range(times)])
    kept = out[out != 0]
    torch.testing.assert_close(kept, torch.full_like(kept, 1 / (1 - dropout.p)), rtol=0, atol=0)
    return out == 0


def assert_bernoulli(dropped: torch.Tensor, p: float) -> None:
    """Dropped independently with probability p: overall, at the end, in pairs of neighbours and of distant
    elements, and the spread of per-row counts. Tolerances are 6 standard deviations."""
    flat = dropped.reshape(dropped.shape[0], -1).double()
    count = flat.numel()

    def near(observed: float, expected: float, trials: int) -> None:
        assert abs(observed - expected) < 6 * math.sqrt(expected * (1 - expected) / trials) + 1e-12, \
            (observed, expected)

    near(flat.mean().item(), p, count)
    tail = flat[:, -flat.shape[1] // 10:]
    near(tail.mean().item(), p, tail.numel())  # the gaps reach the end
    near(flat[:, 0].mean().item(), p, flat.shape[0])  # the first and last elements: no off-by-one
    near(flat[:, -1].mean().item(), p, flat.shape[0])
    near((flat[:, 1:] * flat[:, :-1]).mean().item(), p * p, count)
    near((flat[:, 97:] * flat[:, :-97]).mean().item(), p * p, count)
    per_row = flat.sum(1)
    n = flat.shape[1]
    variance = n * p * (1 - p)
    assert 0.7 * variance < per_row.var().item() < 1.4 * variance  # binomial spread, not a fixed count


@pytest.mark.parametrize("p", [0.05, 0.2])
def test_gap_dropout_masks_are_independent_bernoulli_draws(p):
    torch.manual_seed(0)
    assert_bernoulli(masks(GapDropout(p), (3, 70, 48), 400), p)


def test_gap_dropout_compiled_with_changing_lengths_draws_the_same_distribution():
    torch.manual_seed(1)
    dropout = GapDropout(0.05)
    compiled = torch.compile(dropout, dynamic=True)
    for length in (50, 173, 301):
        assert_bernoulli(masks(compiled, (1, length, 64), 300), 0.05)


def test_gap_dropout_gradient_is_the_mask_and_eval_is_the_identity():
    torch.manual_seed(2)
    dropout = GapDropout(0.1)
    x = torch.randn(4, 33, requires_grad=True)
    out = dropout(x)
    out.sum().backward()
    torch.testing.assert_close(x.grad, (out != 0).float() / 0.9, rtol=0, atol=0)
    torch.testing.assert_close(out, x.detach() * (out != 0) / 0.9)
    dropout.eval()
    assert dropout(x) is x
    assert GapDropout(0.0).train()(x) is x
    empty = torch.ones(0, 5)
    assert dropout.train()(empty).shape == (0, 5)


@pytest.mark.parametrize("p, kind", [(0.05, GapDropout), (0.5, torch.nn.Dropout), (0.0, torch.nn.Identity)])
def test_lora_layers_get_gap_dropout_where_p_is_small(p, kind):
    model = add_lora(build_model(build_tokenizer()), 4, 8, p, ["all-linear"])
    dropouts = [m.lora_dropout["default"] for m in model.modules() if hasattr(m, "lora_dropout")]
    assert len(dropouts) == 2 * 7 and all(type(d) is kind for d in dropouts)
    assert model.peft_config["default"].lora_dropout == p  # the saved adapter config is unchanged
