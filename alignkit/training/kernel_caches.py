"""A bound on the kernels oneDNN keeps per matrix shape, for CPU training on sequences of varying length.

On a CPU, PyTorch runs bf16 matmuls through oneDNN, which compiles a kernel for each exact shape and keeps it
in two caches of 1024 entries (oneDNN's primitive cache and ideep's LRU cache above it). One sequence per
forward pass, alignkit's CPU layout, makes nearly every pass a new shape, so these kernels pile up step after
step until the caches are full, hundreds of megabytes later. A pass needs only its own shapes, and compiling
a kernel costs far less than running the pass, so a few lengths' worth of entries keep the speed and bound the
memory (measurements in docs/performance.md, "Bounded kernel caches on a CPU"). Each cache reads its
environment variable once, when the process first uses it, which is why the command line sets them before
any command runs; a capacity the user set wins. GPU runs do not use these caches, so the setting costs them
nothing.
"""

from __future__ import annotations

import os

CAPACITY = 128  # entries: a few sequence lengths' kernels (SmolLM2 makes 21 per length, 31 with LoRA)
# oneDNN also reads the variable under its former DNNL_ prefix: a user's setting under either name wins.
VARIABLES = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": ("DNNL_PRIMITIVE_CACHE_CAPACITY",), "LRU_CACHE_CAPACITY": ()}


def bound() -> None:
    """Cap oneDNN's per-shape kernel caches at CAPACITY entries, unless the user chose a capacity."""
    for name, aliases in VARIABLES.items():
        if not any(alias in os.environ for alias in aliases):
            os.environ.setdefault(name, str(CAPACITY))
