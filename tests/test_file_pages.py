"""models.file_pages.forget: the unwritten pages of a model file under a converted weight go, nothing is lost."""

from __future__ import annotations

import mmap
import sys

import numpy as np
import pytest
import torch

from alignkit.models.file_pages import forget

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and madvise are Linux's")


def resident_kib(path) -> int:
    """Resident KiB of this process's mappings of `path` (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            if "-" in line.split()[0] and len(line.split()) >= 5:
                inside = line.rstrip().endswith(str(path))
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1])
    return total


def mapped_tensor(tmp_path, n: int = 1 << 20):
    """A float32 tensor that is a view of a private (copy-on-write) file mapping, as transformers loads weights."""
    path = tmp_path / "weights.bin"
    values = np.arange(n, dtype=np.float32)
    values.tofile(path)
    return path, values, torch.from_numpy(np.memmap(path, dtype=np.float32, mode="c"))


def test_the_pages_of_a_read_weight_go_and_reading_it_again_gives_the_same_values(tmp_path):
    path, values, tensor = mapped_tensor(tmp_path)
    assert float(tensor.sum()) == float(values.sum())  # every page read
    assert resident_kib(path) >= 4 * len(values) // 1024 - 8
    dropped = forget(tensor)
    assert dropped >= 4 * len(values) - 2 * mmap.PAGESIZE
    assert resident_kib(path) <= 2 * mmap.PAGESIZE // 1024
    np.testing.assert_array_equal(tensor.numpy(), values)  # read back from the file


def test_pages_written_since_loading_are_kept(tmp_path):
    path, values, tensor = mapped_tensor(tmp_path)
    tensor.sum()
    tensor[1000:3000] = -1.0  # copy on write: these pages are anonymous memory now
    forget(tensor)
    expected = values.copy()
    expected[1000:3000] = -1.0
    np.testing.assert_array_equal(tensor.numpy(), expected)
    assert path.read_bytes() == values.tobytes()  # the file itself is never written


def test_memory_that_is_not_a_file_mapping_is_left_alone():
    tensor = torch.arange(1 << 20, dtype=torch.float32)
    assert forget(tensor) == 0
    assert torch.equal(tensor, torch.arange(1 << 20, dtype=torch.float32))


def test_storing_a_loaded_lora_base_in_bf16_hands_back_the_model_file_layer_by_layer(tiny_model_dir, tmp_path,
                                                                                     monkeypatch):
    """The pages read while loading go as each layer is converted, not only once the last weight is gone."""
    import shutil

    from alignkit.models import file_pages
    from alignkit.models.load import add_lora, load_model
    from alignkit.training.backend import store_frozen_linears_in_bf16

    folder = shutil.copytree(tiny_model_dir, tmp_path / "model")  # a file no other test has mapped
    path = folder / "model.safetensors"
    model = add_lora(load_model(folder), r=4, alpha=8, dropout=0.0, targets=["all-linear"])
    seen = []
    real_forget = file_pages.forget
    monkeypatch.setattr(file_pages, "forget", lambda *a: (real_forget(*a), seen.append(resident_kib(path)))[0])
    store_frozen_linears_in_bf16(model)
    # resident after each converted tensor, while the file is still mapped: falling to (almost) nothing
    assert len(seen) > 10 and seen[0] > 32 and seen[-1] <= 8
    assert all(later <= earlier for earlier, later in zip(seen, seen[1:], strict=False))
