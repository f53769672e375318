"""The sparse lookup gradient of a tied embedding gives the dense path's gradients (to fp32 rounding)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from accelerate import Accelerator

from alignkit.training import sparse_lookup
from alignkit.training.backend import Backend
from tests.conftest import write_jsonl
from tests.test_distributed import SFT_ROWS, run


def tied_model(vocab: int = 300, tie: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    return LlamaForCausalLM(config)


@pytest.mark.parametrize("bf16", [False, True])
def test_tied_lookup_gradient_is_sparse_and_grad_stays_dense_and_equal(bf16):
    dense = tied_model()
    sparse = copy.deepcopy(dense)
    sparse.tie_weights()
    assert sparse_lookup.configure(sparse, Backend(Accelerator(cpu=True)))
    assert sparse.get_input_embeddings().sparse and not dense.get_input_embeddings().sparse
    torch.manual_seed(1)
    passes = [torch.randint(0, 300, (1, length)) for length in (7, 19, 4)]
    for model in (dense, sparse):
        for ids in passes:  # gradient accumulation over passes of different lengths
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                model(input_ids=ids, labels=ids).loss.backward()
    for (name, p_dense), p_sparse in zip(dense.named_parameters(), sparse.parameters(), strict=True):
        assert p_sparse.grad.layout == torch.strided, name
        if name == "model.embed_tokens.weight":  # a token read twice has its rows summed in another order
            torch.testing.assert_close(p_sparse.grad, p_dense.grad, rtol=0, atol=1e-7 * p_dense.grad.abs().max())
        else:
            assert torch.equal(p_dense.grad, p_sparse.grad), name


def test_a_pass_that_misses_the_head_leaves_a_dense_gradient():
    model = tied_model()
    sparse_lookup.configure(model, Backend(Accelerator(cpu=True)))
    model.get_input_embeddings()(torch.tensor([[3, 5, 3]])).sum().backward()
    grad = model.get_input_embeddings().weight.grad
    assert grad.layout == torch.strided
    assert grad[3].eq(2).all() and grad[5].eq(1).all() and grad[4].eq(0).all()


def test_untied_or_frozen_embeddings_keep_the_dense_lookup():
    backend = Backend(Accelerator(cpu=True))
    assert not sparse_lookup.configure(tied_model(tie=False), backend)
    frozen = tied_model()
    frozen.get_input_embeddings().weight.requires_grad_(False)
    assert not sparse_lookup.configure(frozen, backend)
    assert not frozen.get_input_embeddings().sparse


def test_ddp_with_a_tied_embedding_follows_one_process(tmp_path, tokenizer):
    """2 processes (DDP over gloo, gradients reduced after the sparse and dense parts are summed) against one."""
    folder = tmp_path / "tied"
    model = tied_model(vocab=len(tokenizer))
    model.config.eos_token_id, model.config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    data = write_jsonl(tmp_path / "rows.jsonl", SFT_ROWS)
    common = ["sft", "--model", str(folder), "--data", str(data), "--max-steps", "3", "--dtype", "fp32",
              "--save-steps", "0", "--lr", "1e-3"]
    run([*common, "--output-dir", str(tmp_path / "one"), "--batch-size", "4"], processes=1)
    run([*common, "--output-dir", str(tmp_path / "two"), "--batch-size", "2", "--strategy", "ddp"], processes=2)
    losses = [[json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
              for name in ("one", "two")]
    assert len(losses[0]) == 3 and losses[0] == pytest.approx(losses[1], abs=1e-6)
    assert losses[0][2] < losses[0][0]
