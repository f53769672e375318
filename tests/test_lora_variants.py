"""LoRA variants through peft (DoRA, rsLoRA, PiSSA / OLoRA, LoRA+) and NEFTune: each reaches the model or the
optimizer, and short runs with each work."""

from __future__ import annotations

import math

import pytest
import torch

from alignkit.api import make_config, make_dpo_config, make_sft_config
from alignkit.config import RMConfig
from alignkit.errors import UserError
from alignkit.models import neftune
from alignkit.models.load import build_policy
from alignkit.recipes import dpo, sft
from alignkit.training.optim import build_optimizer, build_scheduler
from tests.conftest import write_jsonl

ROWS = [{"prompt": "Add 12 and 30.", "completion": "The answer is 42."},
        {"prompt": "Hello", "completion": "hello there"},
        {"prompt": "What is the capital of France?", "completion": "Paris."},
        {"prompt": "Write a short poem.", "completion": "The sea is blue."}]
PAIRS = [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": "No."} for r in ROWS]


def sft_config(tmp_path, model_dir, **values):
    data = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    return make_sft_config({"model": str(model_dir), "data": [str(data)], "output_dir": str(tmp_path / "out"),
                            "dtype": "fp32", "save_steps": 0, "batch_size": 2, "max_steps": 2, "lr": 1e-2,
                            "lora": True, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, **values})


def lora_layers(model):
    return [m for m in model.modules() if hasattr(m, "lora_A") and "default" in m.lora_A]


# ---------------------------------------------------------------- each setting reaches peft / the optimizer

def test_dora_magnitudes_exist_and_train(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    cfg = sft_config(tmp_path, tiny_model_dir, use_dora=True)
    initial = build_policy(cfg, tiny_model_dir, None)
    magnitudes = {n: p.detach().clone() for n, p in initial.named_parameters() if "lora_magnitude_vector" in n}
    assert magnitudes and all(p.requires_grad for n, p in initial.named_parameters() if n in magnitudes)
    sft.run(cfg)
    saved = load_file(tmp_path / "out" / "final" / "adapter_model.safetensors")
    trained = {k: v for k, v in saved.items() if "lora_magnitude_vector" in k}
    assert len(trained) == len(magnitudes)
    assert all(not torch.equal(trained[k], v) for k, v in zip(sorted(trained), [magnitudes[n] for n in
                                                                                   sorted(magnitudes)], strict=True))


@pytest.mark.parametrize("rslora, expected", [(False, 8 / 4), (True, 8 / math.sqrt(4))])
def test_rslora_scales_by_alpha_over_sqrt_r(tmp_path, tiny_model_dir, rslora, expected):
    model = build_policy(sft_config(tmp_path, tiny_model_dir, use_rslora=rslora), tiny_model_dir, None)
    layers = lora_layers(model)
    assert layers and all(m.scaling["default"] == pytest.approx(expected) for m in layers)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_change_the_base_and_final_is_a_lora_of_the_unchanged_base(tmp_path, tiny_model_dir, init):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = sft_config(tmp_path, tiny_model_dir, lora_init=init)
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = build_policy(cfg, tiny_model_dir, None)
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    assert not torch.allclose(layer.base_layer.weight, original.model.layers[0].self_attn.q_proj.weight)
    with torch.no_grad():  # the initial adapter restores the original function
        ids = torch.tensor([[5, 6, 7, 8, 9]])
        torch.testing.assert_close(model(input_ids=ids).logits, original(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    _, trained, _ = sft.train(cfg)
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                         tmp_path / "out" / "final")
    assert reloaded.peft_config["default"].r == 2 * cfg.lora_r  # [A | A0], [B | −B0]
    trained.eval()
    reloaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, trained(input_ids=ids).logits, atol=1e-4,
                                   rtol=1e-4)


def test_loraplus_gives_the_b_matrices_lr_times_the_ratio(tmp_path, tiny_model_dir):
    cfg = sft_config(tmp_path, tiny_model_dir, loraplus_lr_ratio=16.0, lr=1e-3)
    model = build_policy(cfg, tiny_model_dir, None)
    optimizer = build_optimizer(model, cfg.lr, 0.1, cfg.loraplus_lr_ratio)
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        kinds = {"lora_B" in names[id(p)] for p in group["params"]}
        assert len(kinds) == 1
        assert group["lr"] == pytest.approx(1.6e-2 if kinds == {True} else 1e-3)
    assert optimizer.param_groups[0]["lr"] == 1e-3  # the lr the metrics log
    scheduler = build_scheduler(optimizer, "cosine", 10, 0.2)
    scheduler.step()
    rates = {("lora_B" in names[id(g["params"][0])]): g["lr"] for g in optimizer.param_groups}
    assert rates[True] == pytest.approx(16 * rates[False]) and rates[False] > 0
    plain = build_optimizer(model, cfg.lr, 0.1)
    assert all(g["lr"] == 1e-3 for g in plain.param_groups) and len(plain.param_groups) == 1


# ---------------------------------------------------------------- short runs with each

VARIANTS = {"dora": {"use_dora": True}, "rslora": {"use_rslora": True}, "pissa": {"lora_init": "pissa"},
            "olora": {"lora_init": "olora"}, "loraplus": {"loraplus_lr_ratio": 16.0}}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_two_step_sft_and_dpo_runs_work_with_each_variant(tmp_path, tiny_model_dir, variant):
    summary = sft.run(sft_config(tmp_path, tiny_model_dir, **VARIANTS[variant]))
    assert summary["steps"] == 2 and math.isfinite(summary["final_loss"])
    data = write_jsonl(tmp_path / "prefs.jsonl", PAIRS)
    summary = dpo.run(make_dpo_config(model=str(tiny_model_dir), data=[str(data)], output_dir=str(tmp_path / "d"),
                                      dtype="fp32", save_steps=0, batch_size=2, max_steps=2, lr=1e-3, lora=True,
                                      lora_r=4, lora_dropout=0.0, **VARIANTS[variant]))
    assert summary["steps"] == 2 and math.isfinite(summary["final_loss"])
    # the base under a PiSSA / OLoRA adapter is not the initial policy, so it cannot be the reference
    assert summary["reference"] == ("copy" if "lora_init" in VARIANTS[variant] else "adapter")


def test_variants_without_lora_or_out_of_range_are_one_line_errors(tmp_path, tiny_model_dir):
    with pytest.raises(UserError, match="use_dora, loraplus_lr_ratio only apply to LoRA"):
        sft_config(tmp_path, tiny_model_dir, lora=False, use_dora=True, loraplus_lr_ratio=4)
    with pytest.raises(UserError, match="'loraplus_lr_ratio' must be > 0"):
        sft_config(tmp_path, tiny_model_dir, loraplus_lr_ratio=0)
    with pytest.raises(UserError, match="'lora_init' must be one of default, pissa, olora"):
        sft_config(tmp_path, tiny_model_dir, lora_init="loftq")
    with pytest.raises(UserError, match="reference 'adapter' cannot be used with lora_init pissa"):
        make_dpo_config(data=["x.jsonl"], lora=True, lora_init="pissa", reference="adapter")
    with pytest.raises(UserError, match="lora_init olora cannot be combined with use_dora"):
        sft_config(tmp_path, tiny_model_dir, lora_init="olora", use_dora=True)
    with pytest.raises(UserError, match="lora_init pissa is not available for reward models"):
        make_config(RMConfig, data=["x.jsonl"], lora=True, lora_init="pissa")
    with pytest.raises(UserError, match="'neftune_noise_alpha' must be >= 0"):
        sft_config(tmp_path, tiny_model_dir, neftune_noise_alpha=-1)


# ---------------------------------------------------------------- NEFTune

def test_neftune_noise_has_its_scale_in_training_and_none_in_eval(tokenizer):
    from tests.conftest import build_model

    model = build_model(tokenizer)
    embeddings = model.get_input_embeddings()
    ids = torch.randint(0, len(tokenizer), (3, 50))
    clean = embeddings(ids).detach()
    handle = neftune.attach(model, 5.0)
    scale = 5.0 / math.sqrt(50 * clean.shape[-1])
    model.train()
    noise = embeddings(ids).detach() - clean
    assert noise.abs().max() <= scale * (1 + 1e-5) and noise.abs().max() > 0.95 * scale
    assert noise.std().item() == pytest.approx(scale / math.sqrt(3), rel=0.05)  # U(−s, s) has std s/√3
    assert not torch.equal(noise, embeddings(ids).detach() - clean)  # fresh noise each pass
    model.eval()
    assert torch.equal(embeddings(ids), clean)
    handle.remove()
    model.train()
    assert torch.equal(embeddings(ids), clean)


def test_neftune_sft_run_trains_with_noise_and_leaves_none_behind(tmp_path, tiny_model_dir):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    plain = sft.run(sft_config(tmp_path / "a", tiny_model_dir, lora=False, eval_data=[str(write_jsonl(
        tmp_path / "eval.jsonl", ROWS))]))
    noisy, model, _ = sft.train(sft_config(tmp_path / "b", tiny_model_dir, lora=False, neftune_noise_alpha=10.0,
                                           eval_data=[str(tmp_path / "eval.jsonl")]))
    assert noisy["final_loss"] != plain["final_loss"]
    assert not model.get_input_embeddings()._forward_hooks
