"""oneDNN's per-shape kernel caches are bounded on a CPU, so memory stops growing with new sequence lengths."""

import ctypes
import os
import subprocess
import sys

import pytest
import torch

from alignkit.training import kernel_caches

# Runs in a fresh process: each cache reads its capacity once, when the process first uses it.
GROWTH = """
import ctypes, sys, torch
from alignkit.training import kernel_caches

class Mallinfo(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Mallinfo
if sys.argv[1] == "bound":
    kernel_caches.bound(torch.device("cpu"))
layer = torch.nn.Linear(576, 1536)
for length in range(100, 300):  # 200 new shapes, each with its forward and two backward matmuls
    if length == 200:  # a bounded cache is full by now: it evicts as much as it adds
        before = libc.mallinfo2().uordblks
    x = torch.randn(length, 576, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.float().sum().backward()
print((libc.mallinfo2().uordblks - before) / 2**20)
"""


def heap_growth_mib(mode: str) -> float:
    env = {name: value for name, value in os.environ.items() if name not in kernel_caches.VARIABLES}
    done = subprocess.run([sys.executable, "-c", GROWTH, mode], capture_output=True, text=True, env=env, check=True)
    return float(done.stdout.split()[-1])


def test_bound_sets_both_capacities_on_cpu_only(monkeypatch):
    for name in kernel_caches.VARIABLES:
        monkeypatch.delenv(name, raising=False)
    kernel_caches.bound(torch.device("cuda"))
    assert all(name not in os.environ for name in kernel_caches.VARIABLES)
    kernel_caches.bound(torch.device("cpu"))
    assert all(os.environ[name] == str(kernel_caches.CAPACITY) for name in kernel_caches.VARIABLES)


def test_a_capacity_the_user_chose_wins(monkeypatch):
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "7")
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    kernel_caches.bound(torch.device("cpu"))
    assert os.environ["LRU_CACHE_CAPACITY"] == "7"
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == str(kernel_caches.CAPACITY)


def test_memory_stops_growing_with_new_shapes():
    try:
        has_mallinfo2 = hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")
    except OSError:
        has_mallinfo2 = False
    if not has_mallinfo2:
        pytest.skip("needs glibc's mallinfo2")
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("bf16 matmuls do not go through oneDNN on this CPU")
    unbounded = heap_growth_mib("default")
    if unbounded < 50:
        pytest.skip(f"this build keeps no per-shape kernels ({unbounded:.0f} MiB over 100 shapes)")
    bounded = heap_growth_mib("bound")
    assert bounded < unbounded / 5, (bounded, unbounded)
