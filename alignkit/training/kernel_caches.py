"""A bound on the kernels oneDNN keeps per matrix shape, for CPU training on sequences of varying length.

On a CPU, PyTorch runs bf16 matmuls through oneDNN, which compiles a kernel for each exact shape and keeps it
in two caches of 1024 entries each (oneDNN's primitive cache and ideep's LRU cache above it). One sequence per
forward pass, alignkit's CPU layout, makes nearly every pass a new shape: about 21 new kernels per new length
for SmolLM2-135M, 12 MB that stay resident, so a run's memory grows step after step until the caches hold
over half a gigabyte (PyTorch issues 27971 and 29893 describe the same growth in inference). A pass needs only
its own shapes, and compiling a kernel takes under a millisecond against the pass's seconds, so a few lengths'
worth of entries keep the speed and bound the memory (docs/performance.md has the measurements). Each cache
reads its environment variable once, when the process first uses it: a value the user set wins, and a
process that already ran bf16 matmuls keeps the capacity it started with.
"""

from __future__ import annotations

import os

import torch

CAPACITY = 128  # entries: a few lengths' kernels (a SmolLM2 pass makes 21 per length, with LoRA 31)
VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


def bound(device: torch.device) -> None:
    """Cap oneDNN's per-shape kernel caches at CAPACITY entries on a CPU, unless the user chose a capacity."""
    if device.type != "cpu":
        return
    for name in VARIABLES:
        os.environ.setdefault(name, str(CAPACITY))
