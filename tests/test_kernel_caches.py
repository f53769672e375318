"""oneDNN's per-shape kernel caches are bounded on a CPU, so memory stops growing with new sequence lengths."""

import ctypes
import os
import subprocess
import sys
import types

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
    kernel_caches.bound()
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


ALL_NAMES = [*kernel_caches.VARIABLES, *(a for aliases in kernel_caches.VARIABLES.values() for a in aliases)]


def heap_growth_mib(mode: str) -> float:
    env = {name: value for name, value in os.environ.items() if name not in ALL_NAMES}
    done = subprocess.run([sys.executable, "-c", GROWTH, mode], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    return float(done.stdout.split()[-1])


@pytest.fixture
def no_capacities(monkeypatch):
    """None of the variables set, and whatever the test sets undone afterwards."""
    for name in ALL_NAMES:
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


def test_bound_sets_both_capacities(no_capacities):
    kernel_caches.bound()
    assert all(os.environ[name] == str(kernel_caches.CAPACITY) for name in kernel_caches.VARIABLES)


def test_a_capacity_the_user_chose_wins_under_either_name(no_capacities, monkeypatch):
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "7")
    monkeypatch.setenv("DNNL_PRIMITIVE_CACHE_CAPACITY", "9")
    kernel_caches.bound()
    assert os.environ["LRU_CACHE_CAPACITY"] == "7"
    assert "ONEDNN_PRIMITIVE_CACHE_CAPACITY" not in os.environ  # oneDNN falls back to the DNNL_ name


def test_recipes_and_the_command_line_bound_the_caches(no_capacities, monkeypatch):
    from alignkit import cli
    from alignkit.training.backend import Backend

    Backend.build("auto")
    assert os.environ["LRU_CACHE_CAPACITY"] == str(kernel_caches.CAPACITY)
    monkeypatch.delenv("LRU_CACHE_CAPACITY")
    seen = []  # what a command finds when it starts
    runner = types.SimpleNamespace(run=lambda cfg: seen.append(os.environ.get("LRU_CACHE_CAPACITY")))
    monkeypatch.setattr(cli.importlib, "import_module", lambda name: runner)
    assert cli.main(["sft", "--data", "rows.jsonl"]) == 0
    assert seen == [str(kernel_caches.CAPACITY)]


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
