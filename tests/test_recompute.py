"""Activation checkpointing: the same numbers as without it, and `auto` turns it on only when memory is short."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from alignkit.api import make_dpo_config, make_sft_config
from alignkit.recipes import dpo, sft
from alignkit.training import recompute
from tests.conftest import write_jsonl


def test_every_n_layers_checkpoints_as_few_layers_as_fit():
    gib = 2 ** 30
    assert recompute.every_n_layers(1 * gib, 2 * gib, 10 * gib) is None  # 3 of the 9 usable GiB
    assert recompute.every_n_layers(1 * gib, 16 * gib, 10 * gib) == 2  # half of 16 GiB fits in 8
    assert recompute.every_n_layers(1 * gib, 9 * gib, 10 * gib) == 8  # 7/8 of 9 fits in 8
    assert recompute.every_n_layers(9 * gib, 16 * gib, 10 * gib) == 1  # nothing fits: every layer


def checkpointed_layers(model) -> list[bool]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return [bool(getattr(layer, "gradient_checkpointing", False)) for layer in base.model.layers]


def rows_of(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_sft_with_checkpointing_follows_the_same_trajectory(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": f"Say {i}.", "completion": "word " * (i + 2)}
                                                 for i in range(6)])
    common = {"model": str(tiny_model_dir), "data": [str(data)], "dtype": "fp32", "max_steps": 3, "batch_size": 2,
              "save_steps": 0, "lr": 1e-3}
    _, plain, _ = sft.train(make_sft_config(common, output_dir=str(tmp_path / "off"), activation_checkpointing="off"))
    _, recomputed, _ = sft.train(make_sft_config(common, output_dir=str(tmp_path / "on"),
                                                 activation_checkpointing="on"))
    assert not any(checkpointed_layers(plain)) and all(checkpointed_layers(recomputed))
    for a, b in zip(rows_of(tmp_path / "off"), rows_of(tmp_path / "on"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    off, on = (load_file(tmp_path / d / "final" / "model.safetensors") for d in ("off", "on"))
    assert max((off[k] - on[k]).abs().max().item() for k in off) < 1e-6


def test_dpo_lora_with_checkpointing_gives_the_same_metrics(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": f"Q{i}", "chosen": f"yes {i} " * 3, "rejected": f"no {i}"}
                                                  for i in range(4)])
    common = {"model": str(tiny_model_dir), "data": [str(data)], "dtype": "fp32", "max_steps": 2, "batch_size": 2,
              "save_steps": 0, "lr": 1e-2, "lora": True, "lora_dropout": 0.0}
    dpo.run(make_dpo_config(common, output_dir=str(tmp_path / "off"), activation_checkpointing="off"))
    dpo.run(make_dpo_config(common, output_dir=str(tmp_path / "on"), activation_checkpointing="on"))
    for a, b in zip(rows_of(tmp_path / "off"), rows_of(tmp_path / "on"), strict=True):
        for key in ("loss", "rewards/margins", "logps/chosen"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), key


@pytest.mark.parametrize("free_gib, expected", [(64.0, "off (activations fit in memory)"), (1e-4, "every layer")])
def test_auto_decides_from_the_free_memory(tmp_path, tiny_model_dir, monkeypatch, capsys, free_gib, expected):
    monkeypatch.setattr(recompute, "free_memory", lambda device: free_gib * 2 ** 30)
    data = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "Hi", "completion": "there"}])
    _, model, _ = sft.train(make_sft_config(model=str(tiny_model_dir), data=[str(data)], dtype="fp32", max_steps=1,
                                            save_steps=0, output_dir=str(tmp_path / "out")))
    assert f"activation checkpointing {expected}" in capsys.readouterr().err
    assert all(checkpointed_layers(model)) == (expected == "every layer")


def test_the_largest_forward_pass_follows_the_layout():
    import torch

    from alignkit.data.tokenize import TokenizedRow

    rows = [TokenizedRow([1] * n, [1] * n, "r") for n in (10, 40)]
    cpu = torch.device("cpu")
    sizes = {layout: sft.SFT(make_sft_config(data=["a.jsonl"], layout=layout, batch_size=4,
                                             max_length=64)).longest_forward(rows, cpu)
             for layout in ("per_sequence", "padded", "packed")}
    assert sizes == {"per_sequence": 40, "padded": 160, "packed": 256}
