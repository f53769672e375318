"""The memory-planning table's formula, checked against arithmetic done by hand."""

from __future__ import annotations

import pytest

from alignkit.training.memory_plan import MODELS, gib_per_gpu, table


def test_one_cell_by_hand_7b_full_zero2_on_8_gpus():
    # weights 4 × 6.738e9 = 26.952e9 B; gradients + AdamW 12 × 6.738e9 / 8 = 10.107e9 B;
    # activations 34 × 2048 × 4096 × 32 = 9,126,805,504 B; total 46.186e9 B = 43.01 GiB
    assert gib_per_gpu(MODELS["7B"], lora=False, strategy="zero2", gpus=8, tokens=2048) == pytest.approx(43.01,
                                                                                                       abs=0.01)


def test_lora_adapter_size_by_hand_135m():
    # rank 16 × (q 576+576, k 576+192, v 576+192, o 576+576, gate 576+1536, up 576+1536, down 1536+576) × 30
    assert MODELS["135M"].lora_params() == 16 * 10176 * 30 == 4_884_480


def test_sharding_never_costs_more_and_one_gpu_shards_nothing():
    for shape in MODELS.values():
        for lora in (False, True):
            one = {s: gib_per_gpu(shape, lora, s, 1, 2048) for s in ("ddp", "zero2", "fsdp")}
            assert one["ddp"] == one["zero2"] == one["fsdp"]
            eight = [gib_per_gpu(shape, lora, s, 8, 2048) for s in ("ddp", "zero2", "fsdp")]
            assert eight[0] >= eight[1] >= eight[2]


def test_table_has_a_row_per_model_training_and_strategy():
    rows = table().splitlines()[2:]
    assert len(rows) == len(MODELS) * 2 * 3
    assert rows[0].startswith("| 135M | full | DDP |")
