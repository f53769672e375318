"""torch.compile of the decoder layers: the same numbers as without it, and `auto` only where it pays."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from alignkit.api import make_dpo_config, make_sft_config
from alignkit.errors import UserError
from alignkit.models.load import add_lora
from alignkit.models.logprobs import label_logprobs
from alignkit.recipes import dpo, sft
from alignkit.training import compiling
from tests.conftest import build_model, build_tokenizer, write_jsonl

CPU = torch.device("cpu")


def rows_of(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def is_compiled(layer) -> bool:
    return layer._compiled_call_impl is not None


@pytest.fixture
def model():
    return build_model(build_tokenizer())


def test_auto_leaves_short_runs_alone(model):
    compiled, said = compiling.configure(model, "auto", 99, CPU, sharded=False)
    assert not compiled and "99 steps < 100" in said
    assert not any(is_compiled(layer) for layer in compiling.decoder_layers(model))


def test_auto_compiles_every_decoder_layer_of_a_long_run(model):
    compiled, said = compiling.configure(model, "auto", 100, CPU, sharded=False)
    layers = compiling.decoder_layers(model)
    assert compiled and said.startswith(f"{len(layers)} decoder layers") and len(layers) == len(model.model.layers)
    assert all(is_compiled(layer) for layer in layers)
    assert not any("_orig_mod" in name for name in model.state_dict())  # saved models keep their names


def test_compiling_gives_way_to_sharding_and_recomputation(model):
    said = compiling.configure(model, "auto", 500, CPU, sharded=True)
    assert said == (False, "off (FSDP or DeepSpeed shards the layers)")
    model.activation_checkpointing_enable()
    assert compiling.configure(model, "auto", 500, CPU, sharded=False)[1].startswith("off (activation checkpointing")
    with pytest.raises(UserError, match="compile: on is not possible here: activation checkpointing"):
        compiling.configure(model, "on", 500, CPU, sharded=False)
    assert compiling.configure(model, "off", 500, CPU, sharded=False) == (False, "off")


def test_each_compiled_layer_is_one_graph_with_or_without_lora(model):
    """Asking transformers for hidden states installs its output hooks, whose context-variable read breaks a
    compiled layer's graph; the log-probs must come without them."""
    from torch._dynamo.utils import counters

    lora = add_lora(build_model(build_tokenizer()), 4, 8, 0.05, ["all-linear"])  # GapDropout inside the layers
    for candidate in (model, lora):
        torch._dynamo.reset()
        counters.clear()
        compiling.configure(candidate, "on", 500, CPU, sharded=False)
        input_ids = torch.randint(3, candidate.config.vocab_size, (1, 9))
        labels = input_ids.clone()
        labels[:, :4] = -100
        label_logprobs(candidate, input_ids, labels)[0].sum().backward()
        with torch.no_grad():  # evaluation, DPO's reference pass
            label_logprobs(candidate, input_ids, labels)
        assert not counters["graph_break"], dict(counters["graph_break"])
        # one training and one no-grad graph for all layers: under LoRA too, where the first layer's input is
        # marked as needing a gradient in training passes only
        assert counters["stats"]["unique_graphs"] == 2
    torch._dynamo.reset()


def test_sft_compiled_follows_the_same_trajectory(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": f"Say {i}.", "completion": "word " * (i + 2)}
                                                 for i in range(6)])
    common = {"model": str(tiny_model_dir), "data": [str(data)], "dtype": "fp32", "max_steps": 3, "batch_size": 2,
              "save_steps": 0, "lr": 1e-3, "eval_fraction": 0.34, "eval_steps": 3}
    sft.train(make_sft_config(common, output_dir=str(tmp_path / "off"), compile="off"))
    _, model, _ = sft.train(make_sft_config(common, output_dir=str(tmp_path / "on"), compile="on"))
    assert all(is_compiled(layer) for layer in compiling.decoder_layers(model))
    for a, b in zip(rows_of(tmp_path / "off"), rows_of(tmp_path / "on"), strict=True):
        for key in ("loss", "eval/loss"):
            if key in a:
                assert a[key] == pytest.approx(b[key], abs=1e-5), key
    off, on = (load_file(tmp_path / d / "final" / "model.safetensors") for d in ("off", "on"))
    assert off.keys() == on.keys()
    assert max((off[k] - on[k]).abs().max().item() for k in off) < 1e-5


def test_dpo_lora_compiled_gives_the_same_metrics(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": f"Q{i}", "chosen": f"yes {i} " * 3, "rejected": f"no {i}"}
                                                  for i in range(4)])
    common = {"model": str(tiny_model_dir), "data": [str(data)], "dtype": "fp32", "max_steps": 2, "batch_size": 2,
              "save_steps": 0, "lr": 1e-2, "lora": True, "lora_dropout": 0.0}
    dpo.run(make_dpo_config(common, output_dir=str(tmp_path / "off"), compile="off"))
    dpo.run(make_dpo_config(common, output_dir=str(tmp_path / "on"), compile="on"))
    for a, b in zip(rows_of(tmp_path / "off"), rows_of(tmp_path / "on"), strict=True):
        for key in ("loss", "rewards/margins", "logps/chosen"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), key


def test_two_processes_compiled_match_one_process_plain(tmp_path, tiny_model_dir):
    """DDP over compiled layers (each process compiles its own): the same trajectory as one plain process."""
    from tests.test_distributed import SFT_ROWS, metrics, run

    data = write_jsonl(tmp_path / "rows.jsonl", SFT_ROWS)
    common = ["sft", "--model", str(tiny_model_dir), "--data", str(data), "--max-steps", "3", "--dtype", "fp32",
              "--save-steps", "0", "--grad-accum", "2", "--lr", "1e-3"]
    run([*common, "--batch-size", "4", "--output-dir", str(tmp_path / "one"), "--compile", "off"], processes=1)
    log = run([*common, "--batch-size", "2", "--output-dir", str(tmp_path / "two"), "--compile", "on",
               "--num-processes", "2"], processes=1)
    assert "(ddp)" in log and "compile 2 decoder layers" in log
    for a, b in zip(metrics(tmp_path / "one"), metrics(tmp_path / "two"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)
