"""LoRA's input dropout, drawn as the gaps between dropped elements: the same masks from fewer random numbers.

peft applies `nn.Dropout(p)` to each adapted layer's input before the adapter's down-projection, a fresh mask per
layer (seven per decoder layer with `all-linear` targets), so a step draws one random number for every element of
every adapted input. On a CPU the drawing is the cost: ~5 ns per element in eager mode and ~9 ns inside a compiled
graph, against ~0.1 ns for the multiplication. With SmolLM2-135M that was ~1.7 s of a ~6.5 s LoRA step at p = 0.05.

Where p is small, most of those numbers only say "keep". The positions a sequence of independent Bernoulli(p)
trials drops are exactly the running sums of independent Geometric(p) gaps, so drawing the gaps gives the same
distribution of masks from 1.5·p·n + 256 random numbers instead of n. A gap is floor(ln V / ln(1 − p)) + 1 for
V uniform in (0, 1]: P(gap > k) = P(V ≤ (1 − p)^k) = (1 − p)^k. The count drawn depends on n alone, so a
compiled graph needs no data-dependent size; the gaps fall short of covering all n elements only when a
Binomial(n, p) count exceeds 1.5·its mean + 256, a probability below 1e-50 for any n. As with `nn.Dropout`, the
uniform numbers' resolution bounds how exact the tail is (float32 inside a compiled graph: gaps beyond ~320 at
p = 0.05, chance 6e-8, are cut short).

Only the CPU takes this path; on a GPU, which draws dense masks fast, it calls `F.dropout` as before (not measured)."""

from __future__ import annotations

import math

import torch

# An estimate (only p = 0.05 was measured): a gap costs a logarithm and a running sum besides its random number,
# and 1.5·p·n of them approach n dense draws as p grows.
SPARSE_UP_TO = 0.25


class GapDropout(torch.nn.Module):
    """Inverted dropout (kept elements scaled by 1/(1 − p)) whose mask is drawn as geometric gaps on a CPU."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu":
            return torch.nn.functional.dropout(x, self.p, training=True)
        n = x.numel()
        gaps_per_1024 = math.ceil(1.5 * self.p * 1024)  # integer arithmetic keeps the count symbolic under compile
        uniform = 1.0 - torch.rand(n * gaps_per_1024 // 1024 + 256, dtype=torch.float64, device=x.device)
        gaps = (uniform.log() / math.log1p(-self.p)).floor_().to(torch.int64) + 1
        dropped = (gaps.cumsum(0) - 1).clamp_(max=n)  # position n and beyond: a spare slot, cut off below
        # uint8, not bool: the compiled LoRA benchmark ran at 127 tokens/s with it, 99–105 with a bool mask (and
        # a float mask cost ~200 MiB more, kept for the backward pass)
        keep = torch.ones(n + 1, dtype=torch.uint8, device=x.device).index_fill_(0, dropped, 0)
        return x * keep[:n].view(x.shape) * (1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_gap_dropout(model: torch.nn.Module) -> None:
    """Swap the `nn.Dropout` of every peft LoRA layer with 0 < p ≤ SPARSE_UP_TO for a `GapDropout`."""
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, torch.nn.ModuleDict):
            continue
        for name, dropout in dropouts.items():
            if type(dropout) is torch.nn.Dropout and 0 < dropout.p <= SPARSE_UP_TO:
                dropouts[name] = GapDropout(dropout.p)
