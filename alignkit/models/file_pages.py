"""Handing back the pages of a model file that a converted weight no longer needs.

transformers loads float32 safetensors without copying: each weight is a view of the file's private memory map,
and every page of it that has been read stays resident (and counts in the process's memory) until the last
weight of that file is gone. Converting a model's weights one by one (to bf16, or copying them out of the map)
therefore reads the whole file into memory before any of it can go. `forget` tells the kernel, weight by
weight, that the pages behind a converted weight are not needed (madvise MADV_DONTNEED): a page of a private
file mapping that was never written is dropped, and would be read from the file again if touched, so nothing
can be lost. Pages that were written (copied on write, anonymous memory now) are left alone: /proc/self/pagemap
tells them apart. Meant for a model being converted by one thread: a page written by another thread between
reading pagemap and madvise would lose that write. Off Linux, or without /proc, nothing happens.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import struct

import torch

PAGE = mmap.PAGESIZE
MADV_DONTNEED = 4
PRESENT, FILE_PAGE = 1 << 63, 1 << 61  # /proc/self/pagemap bits (Documentation/admin-guide/mm/pagemap.rst)


def forget(tensor: torch.Tensor, mappings: list[tuple[int, int]] | None = None) -> int:
    """Drop the unwritten pages of a file mapping that lie wholly inside `tensor`'s memory; the bytes dropped.
    `mappings`: `private_file_mappings()` taken once for many tensors (by default read for this one)."""
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        return 0
    start, end = tensor.data_ptr(), tensor.data_ptr() + tensor.numel() * tensor.element_size()
    first, last = -(-start // PAGE), end // PAGE  # whole pages only
    if last <= first:
        return 0
    mappings = private_file_mappings() if mappings is None else mappings
    if not any(low <= start and end <= high for low, high in mappings):
        return 0
    try:
        with open("/proc/self/pagemap", "rb") as pagemap:
            pagemap.seek(first * 8)
            entries = struct.unpack(f"{last - first}Q", pagemap.read((last - first) * 8))
    except (OSError, struct.error):
        return 0
    dropped, run = 0, None
    for i, entry in enumerate((*entries, 0)):
        droppable = entry & PRESENT and entry & FILE_PAGE
        if droppable and run is None:
            run = i
        elif not droppable and run is not None:
            dropped += _dontneed((first + run) * PAGE, (i - run) * PAGE)
            run = None
    return dropped


def private_file_mappings() -> list[tuple[int, int]]:
    """(start, end) of this process's private mappings of files (/proc/self/maps); none where it cannot tell."""
    found = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                path = fields[5].strip() if len(fields) > 5 else ""
                if fields[1].endswith("p") and path.startswith("/") and not path.endswith("(deleted)"):
                    low, high = (int(x, 16) for x in fields[0].split("-"))
                    found.append((low, high))
    except (OSError, ValueError, IndexError):
        return []
    return found


@functools.cache
def _madvise():
    madvise = ctypes.CDLL(None).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return madvise


def _dontneed(address: int, length: int) -> int:
    return length if _madvise()(address, length, MADV_DONTNEED) == 0 else 0
