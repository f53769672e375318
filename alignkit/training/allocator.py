"""CPU training: hand large freed blocks back to the system instead of keeping them in the C heap.

PyTorch allocates CPU tensors with the C library's malloc. glibc serves blocks up to a threshold from its heap,
and its default threshold grows to 32 MiB as soon as a large block has been freed once. A training step then
carves activations of every sequence length out of one heap; the freed holes between them stay resident, so
the process grows by hundreds of MiB beyond the memory its tensors hold, and the peak RSS with it. A fixed
threshold of 1 MiB sends every tensor of a MiB or more (activations, weights, gradients) through mmap, which
returns it to the system when freed, at the cost of fresh zeroed pages on the next allocation. Measured figures:
docs/performance.md. A user's own GLIBC_TUNABLES or MALLOC_* settings, or another allocator preloaded
(jemalloc, tcmalloc), are left alone.
"""

from __future__ import annotations

import ctypes
import os
import platform

M_MMAP_THRESHOLD = -3  # mallopt's parameter number in glibc's malloc.h
MMAP_THRESHOLD_BYTES = 1 << 20


def user_chose_allocator() -> bool:
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    return ("glibc.malloc" in tunables or any(k.startswith("MALLOC_") for k in os.environ)
            or "malloc" in os.environ.get("LD_PRELOAD", ""))


def release_large_blocks() -> bool:
    """Fix glibc's mmap threshold at 1 MiB for this process; True when it was set."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or user_chose_allocator():
        return False
    try:
        return ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
    except (OSError, AttributeError):
        return False
