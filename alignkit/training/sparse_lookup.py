"""A sparse gradient for the token-embedding lookup when the embedding is tied to the output head.

A lookup's gradient is nonzero only in the rows of the tokens read (a few hundred of SmolLM2's 49,152), yet
PyTorch builds it as a dense [V, H] float32 tensor in every backward pass: 113 MB here, freshly allocated,
zero-filled and then added to `.grad`, about 6% of an SFT step on a CPU (docs/performance.md). With
`sparse=True` the lookup hands autograd only those rows. When the weight is tied, the output head's dense
gradient of the same tensor arrives in the same backward pass and autograd adds the two into one dense
gradient, so `.grad` stays dense: clipping, the fused AdamW step and DDP see the numbers they saw before, to
float32 rounding (the rows of a token read more than once are summed in another order;
`tests/test_sparse_lookup.py`). An untied embedding keeps the dense lookup: its gradient would stay
sparse, which the fused optimizer does not take.
"""

from __future__ import annotations

import torch


def configure(model: torch.nn.Module, backend) -> bool:
    """Make a trained, tied embedding's lookup gradient sparse; True when it did.

    Called after `accelerate.prepare`: DDP decides at wrapping time which parameters expect sparse gradients,
    and this one must be reduced as the dense gradient it ends up as. FSDP and DeepSpeed keep the dense lookup
    (their flat, sharded gradient buffers take dense gradients only)."""
    if backend.partitioned:
        return False
    inner = backend.unwrap(model)
    embeddings, head = inner.get_input_embeddings(), inner.get_output_embeddings()
    tied = head is not None and getattr(head, "weight", None) is getattr(embeddings, "weight", False)
    if not (isinstance(embeddings, torch.nn.Embedding) and tied and embeddings.weight.requires_grad):
        return False
    embeddings.sparse = True
    embeddings.weight.register_post_accumulate_grad_hook(_densify)
    return True


def _densify(weight: torch.Tensor) -> None:
    # A backward pass that did not reach the head (no trained token in it) leaves the lookup's sparse rows alone.
    if weight.grad.is_sparse:
        weight.grad = weight.grad.to_dense()
