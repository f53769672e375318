"""Log-probabilities straight from a model: its last hidden states (caught by a forward hook) through the
output head a chunk of positions at a time, so the [N, V] logits of a long sequence never exist at once.

Training (`training.forward`), the KL estimate (`eval.kl`) and `alignkit evaluate` all score through here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from alignkit.data.tokenize import IGNORE
from alignkit.models.load import transformers_model

CHUNK_LOGITS = 2 ** 25  # logits of one chunk: 128 MiB in float32 (vocabularies of 32k to 512k tokens)


def head_chunk(vocab_size: int) -> int:
    """Positions per chunk of `head_logprobs`: as many as keep one chunk's float32 [chunk, V] logits near 128 MiB
    (682 positions at a 49k vocabulary, 220 at 152k, 128 at 262k), between 64 and 1,024. The forward and the
    backward each hold two or three such buffers at once, so with a large vocabulary a fixed number of positions
    would set a step's peak memory; fewer positions per chunk only re-read the head's weight more often."""
    return max(64, min(1024, CHUNK_LOGITS // max(vocab_size, 1)))


def _float_logits(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """float32 logits, softcapped if asked (z = c·tanh(x/c), Gemma 2's final_logit_softcapping)."""
    logits = logits.float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def _target_logps(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(z[y] − logsumexp(z), logsumexp(z)) per row of float32 logits z.

    Without autograd watching, z is overwritten rather than copied (a [N, V] float32 tensor saved); both
    branches do the same arithmetic, so a policy (with gradient) and its reference (without) agree bit for bit."""
    picked = logits.gather(1, targets[:, None])[:, 0]
    top = logits.detach().max(dim=-1).values
    if logits.requires_grad:
        lse = (logits - top[:, None]).exp().sum(dim=-1).log() + top
    else:
        lse = logits.sub_(top[:, None]).exp_().sum(dim=-1).log_().add_(top)
    return picked - lse, lse


def _chunk_logps(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                 softcap: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    return _target_logps(_float_logits(F.linear(hidden, weight, bias), softcap), targets)


def _matmul_weight(weight: torch.Tensor) -> torch.Tensor:
    """The head weight the chunks' matmuls use. Autocast caches its casts of trained weights only, so a frozen
    float32 weight under autocast (LoRA with a tied embedding) is cast here, once for all the chunks of a pass,
    rather than by every chunk; any other weight is used as it is (autocast casts a trained one, and caches it)."""
    device = weight.device.type
    if weight.requires_grad or weight.dtype != torch.float32 or not torch.is_autocast_enabled(device):
        return weight
    return weight.to(torch.get_autocast_dtype(device))


class _HeadLogps(torch.autograd.Function):
    """`head_logprobs` chunk by chunk: ℓ = z[y] − logsumexp(z) for z = head(h) (softcapped if asked), per row.

    The backward recomputes each chunk's logits instead of keeping them, and uses ∂ℓ/∂z = onehot(y) − softmax(z):
    softmax(z) is formed in place from the logsumexp saved by the forward, in one float32 [chunk, V] buffer that
    becomes the gradient. Autograd's log_softmax + nll_loss would hold several such tensors at once (the logits,
    their float copy, log_softmax's output, each backward's gradient); at a 49k vocabulary those are what sets
    the peak memory of an SFT step. The matmuls run under the autocast state of the forward, so with bf16
    autocast they run in bf16 on the weight of `_matmul_weight`, exactly as `F.linear` in the forward does; the
    weight's gradient is summed over chunks in float32. Without autograd watching (a reference, evaluation)
    only the forward runs, the same arithmetic, so a policy and its reference agree bit for bit.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, softcap, chunk_size):
        device = hidden.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        used = _matmul_weight(weight)
        pieces = [_chunk_logps(hidden[s:s + chunk_size], used, bias, targets[s:s + chunk_size], softcap)
                  for s in range(0, hidden.shape[0], chunk_size)]
        logps, lse = (torch.cat(p) for p in zip(*pieces, strict=True))
        ctx.softcap, ctx.chunk_size = softcap, chunk_size
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        return logps

    @staticmethod
    def backward(ctx, grad_logps):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        device, enabled, dtype = ctx.autocast
        wants_hidden, wants_weight, wants_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if wants_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if wants_weight else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if bias is not None and wants_bias else None
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            used = _matmul_weight(weight)
            for s in range(0, hidden.shape[0], ctx.chunk_size):
                rows = slice(s, s + ctx.chunk_size)
                grad = _logit_grad(hidden[rows], used, bias, targets[rows], lse[rows], grad_logps[rows], ctx.softcap)
                grad = grad.to(dtype if enabled else weight.dtype)
                # mm (not a matmul of a transposed view) so that autocast serves the weight from its cache
                if wants_hidden:
                    grad_hidden[rows] = torch.mm(grad, used)
                if wants_weight:
                    grad_weight += torch.mm(grad.T, hidden[rows]).float()
                if grad_bias is not None:
                    grad_bias += grad.sum(0).float()
        grad_weight = grad_weight.to(weight.dtype) if grad_weight is not None else None
        grad_bias = grad_bias.to(bias.dtype) if grad_bias is not None else None
        return grad_hidden, grad_weight, grad_bias, None, None, None


def _logit_grad(hidden, weight, bias, targets, lse, grad_logps, softcap) -> torch.Tensor:
    """∂(Σ g·ℓ)/∂x for one chunk's logits x (before softcapping): g·(onehot(y) − softmax(z)) · ∂z/∂x, in float32."""
    grad = _float_logits(F.linear(hidden, weight, bias), softcap)
    if softcap:  # z = c·tanh(x/c), so ∂z/∂x = 1 − (z/c)²
        dz_dx = grad.div(softcap).square_().neg_().add_(1)
    grad.sub_(lse[:, None]).exp_()  # softmax(z)
    grad.mul_(-grad_logps[:, None])
    grad[torch.arange(len(targets), device=grad.device), targets] += grad_logps
    if softcap:
        grad.mul_(dz_dx)
    return grad


def head_logprobs(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor, softcap: float | None = None,
                  chunk_size: int | None = None) -> torch.Tensor:
    """log softmax(head(hidden))[target] for N positions, chunk by chunk: hidden [N, H], targets [N] → [N].

    Each chunk's [chunk, V] logits exist only while that chunk is computed; under autograd the chunk is
    recomputed in the backward pass (`_HeadLogps`), so the whole [N, V] logits never exist at once.
    With a 49k (SmolLM2) to 262k (Gemma 3) vocabulary these logits are the largest tensor of a step.
    `chunk_size` defaults to `head_chunk` of the head's vocabulary.
    """
    # under ZeRO-3 the weight outside a call of the head is an empty placeholder: its full shape is ds_shape
    vocab = getattr(head, "out_features", None) or getattr(head.weight, "ds_shape", head.weight.shape)[0]
    chunk_size = chunk_size or head_chunk(vocab)
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32)
    # Under DeepSpeed ZeRO-3 (a `ds_id` on the weight) the head's weight is whole only during a call of the head
    # (its hooks gather and free it): the head is called rather than its weight read, and the chunk is not
    # recomputed in the backward pass, where ZeRO-3 would not have gathered a frozen head's weight again
    # (CheckpointError: weight of shape [0]); its logits are kept for the backward instead (up to [N, V] float32).
    # Elsewhere the weight tensor of the forward pass is passed: under FSDP2 the head's attribute may by then
    # point at unsharded storage that FSDP2 has freed.
    if hasattr(head.weight, "ds_id"):
        return torch.cat([_target_logps(_float_logits(head(hidden[s:s + chunk_size]), softcap),
                                        targets[s:s + chunk_size])[0]
                          for s in range(0, hidden.shape[0], chunk_size)])
    return _HeadLogps.apply(hidden, head.weight, head.bias, targets, softcap, chunk_size)


def final_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The last layer's (normalised) hidden states [B, T, H], asking the model for one position of logits only.

    They are the decoder stack's output, caught by a forward hook while the whole model is called (so DDP, FSDP
    and DeepSpeed wrappers see the call). Not `output_hidden_states=True`: that makes transformers hook every
    decoder layer and attention module for good, and inside a compiled layer those hooks' context-variable read
    breaks the graph (each layer became several compiled graphs with eager code between them). A model whose
    decoder stack transformers cannot name is still asked for its hidden states."""
    attention_mask = layer_masks(model, attention_mask, position_ids)
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, logits_to_keep=1,
                  use_cache=False, output_attentions=False)  # explicit: a config's own `output_*` would hook
    stack = _decoder_stack(model)
    if stack is None:
        return model(**kwargs, output_hidden_states=True).hidden_states[-1]
    caught = []
    handle = stack.register_forward_hook(lambda _module, _args, output: caught.append(output[0]))
    try:
        model(**kwargs, output_hidden_states=False)
    finally:
        handle.remove()
    if len(caught) != 1:
        raise RuntimeError(f"{type(stack).__name__} ran {len(caught)} times in one forward pass, expected once")
    return caught[0]


def layer_masks(model, mask: torch.Tensor | None, position_ids: torch.Tensor | None):
    """A 4-D boolean mask of the packed and prefix-shared layouts as the model's layers need it.

    transformers passes a 4-D mask to every layer unchanged: eager attention (Gemma 2's default) adds it to the
    scores, so it must be additive, and a sliding-window layer (Mistral, Phi-3, Gemma 2 and 3) would see further
    back than its window. The window is cut from the mask by position distance (so a
    prefix-shared rejected branch counts from the shared prompt, as in its own row); a model with both layer
    kinds gets transformers' per-kind mapping, which its forward accepts in place of a mask."""
    config = transformers_model(model).config
    window = getattr(config, "sliding_window", None)
    kinds = set(getattr(config, "layer_types", None) or ["sliding_attention"])
    if mask is None or mask.dim() != 4:
        return mask
    if config._attn_implementation == "eager":  # it adds the mask to the scores: True/False would add 1/0
        mask = torch.zeros(mask.shape, device=mask.device).masked_fill_(~mask, torch.finfo(torch.float32).min)
    if not window or "sliding_attention" not in kinds:
        return mask
    positions = position_ids if position_ids is not None else torch.arange(mask.shape[-1], device=mask.device)[None]
    far = (positions[:, :, None] - positions[:, None, :] >= window)[:, None]
    windowed = mask.masked_fill(far, torch.finfo(torch.float32).min) if mask.is_floating_point() else mask & ~far
    return windowed if kinds == {"sliding_attention"} else {"full_attention": mask, "sliding_attention": windowed}


def _decoder_stack(model) -> torch.nn.Module | None:
    """The transformer stack under the language-model head, through DDP/DeepSpeed (`.module`) and peft wrappers;
    None where transformers' `get_decoder` finds none (it then answers with the model itself)."""
    model = transformers_model(model)
    stack = model.get_decoder() if hasattr(model, "get_decoder") else None
    return None if stack is None or stack is model else stack


def output_head(model) -> tuple[torch.nn.Module, float | None]:
    model = getattr(model, "module", model)  # under DDP the head is the wrapped model's
    return model.get_output_embeddings(), getattr(model.config, "final_logit_softcapping", None)


def label_logprobs(model, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   position_ids: torch.Tensor | None = None, chunk_size: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log π(label_{t+1} | ≤ t) at every trained position, computed from hidden states in chunks.

    Returns (logps [N] float32, row [N], column [N]) of the N trained labels' predicting positions, in row-major
    order; logits are never formed for prompt or padding positions.
    """
    trained = labels[:, 1:] != IGNORE
    rows, cols = trained.nonzero(as_tuple=True)
    hidden = final_hidden(model, input_ids, attention_mask, position_ids)
    head, softcap = output_head(model)
    logps = head_logprobs(hidden[:, :-1][rows, cols], head, labels[:, 1:][rows, cols], softcap, chunk_size)
    return logps, rows, cols
