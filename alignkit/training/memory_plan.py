"""Memory per GPU of a training run, from parameter, gradient, optimizer-state and activation sizes.

`python -m alignkit.training.memory_plan` prints the table in docs/scale-out.md. The formula, for P parameters
of which A are trained, N GPUs, L layers of width H, and a micro-batch of T tokens (batch × sequence length):

    weights     4·P bytes        fp32 master weights (alignkit's dtype auto: fp32 weights, bf16 autocast)
    gradients   4·A bytes        fp32, one per trained parameter
    optimizer   8·A bytes        AdamW's two fp32 moments per trained parameter
    activations 34·T·H·L bytes   bf16 activations kept for the backward pass, no activation checkpointing,
                                 fused (SDPA) attention (Korthikanti et al. 2022, arXiv 2205.05198, eq. 1
                                 without the attention-score term); never sharded

    DDP          weights + gradients + optimizer on every GPU
    ZeRO-2       weights on every GPU; gradients and optimizer state divided by N
    FSDP/ZeRO-3  weights, gradients and optimizer state divided by N, plus two decoder layers' gathered
                 weights in flight (2·4·P/L: the layer computing and the one prefetched)

Not counted: the CUDA context and allocator slack (add 1 to 3 GB), the output head's chunk of logits
(alignkit never forms the [T, V] logits; about 2²⁵ of them at a time), and DPO's reference model (a frozen copy
adds 4·P bytes, divided by N under FSDP; none under LoRA's adapter reference or precomputed log-probs).
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2 ** 30
ACTIVATION_BYTES_PER_TOKEN_WIDTH_LAYER = 34
STRATEGIES = ("ddp", "zero2", "fsdp")


@dataclass(frozen=True)
class Shape:
    """A decoder-only transformer's size: parameters, layers, width, MLP width, key/value width."""

    params: float
    layers: int
    hidden: int
    intermediate: int
    kv_width: int

    def lora_params(self, rank: int = 16) -> int:
        """Trainable parameters of a rank-r LoRA adapter on every linear layer of the blocks (alignkit's
        default targets): r·(inputs + outputs) per adapted matrix."""
        h, i, kv = self.hidden, self.intermediate, self.kv_width
        per_layer = (h + h) + 2 * (h + kv) + (h + h) + 2 * (h + i) + (i + h)  # q, k, v, o, gate, up, down
        return rank * per_layer * self.layers


# SmolLM2-135M, Llama-3.2-1B, Llama-2-7B, Llama-3-70B (their config.json figures)
MODELS = {
    "135M": Shape(134.5e6, 30, 576, 1536, 192),
    "1B": Shape(1.236e9, 16, 2048, 8192, 512),
    "7B": Shape(6.738e9, 32, 4096, 11008, 4096),
    "70B": Shape(70.55e9, 80, 8192, 28672, 1024),
}


def state_bytes(shape: Shape, lora: bool, strategy: str, gpus: int) -> float:
    """Weights, gradients and optimizer state on one GPU."""
    trained = shape.lora_params() if lora else shape.params
    weights, grads_and_moments = 4 * shape.params, (4 + 8) * trained
    if strategy == "ddp":
        return weights + grads_and_moments
    if strategy == "zero2":
        return weights + grads_and_moments / gpus
    if strategy == "fsdp":
        in_flight = 2 * 4 * shape.params / shape.layers if gpus > 1 else 0.0
        return (weights + grads_and_moments) / gpus + in_flight
    raise ValueError(f"unknown strategy {strategy}")


def activation_bytes(shape: Shape, tokens: int) -> float:
    return ACTIVATION_BYTES_PER_TOKEN_WIDTH_LAYER * tokens * shape.hidden * shape.layers


def gib_per_gpu(shape: Shape, lora: bool, strategy: str, gpus: int, tokens: int) -> float:
    return (state_bytes(shape, lora, strategy, gpus) + activation_bytes(shape, tokens)) / GIB


def table(tokens: int = 2048, gpu_counts: tuple[int, ...] = (1, 2, 8, 64)) -> str:
    """The markdown table: one row per model × full/LoRA × strategy, one column per GPU count."""
    head = "| model | training | strategy | " + " | ".join(f"{n} GPU{'s' if n > 1 else ''}" for n in gpu_counts)
    lines = [head + " |", "|" + "---|" * (3 + len(gpu_counts))]
    names = {"ddp": "DDP", "zero2": "ZeRO-2", "fsdp": "FSDP / ZeRO-3"}
    for model, shape in MODELS.items():
        for lora in (False, True):
            for strategy in STRATEGIES:
                cells = [f"{gib_per_gpu(shape, lora, strategy, n, tokens):.1f}" for n in gpu_counts]
                kind = "LoRA r16" if lora else "full"
                lines.append(f"| {model} | {kind} | {names[strategy]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(f"GiB per GPU, micro-batch of 2,048 tokens, fp32 weights + AdamW, no activation checkpointing\n\n{table()}")
