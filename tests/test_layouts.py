"""Every batch layout and the chunked log-probs give the plain path's numbers (fp32, to 1e-5)."""

from __future__ import annotations

import pytest
import torch

from alignkit.data import packing
from alignkit.data.formats import to_example
from alignkit.data.prefs import tokenize_preferences
from alignkit.data.sources import Row
from alignkit.data.templates import resolve_template
from alignkit.data.tokenize import tokenize_examples
from alignkit.losses import token_logprobs
from alignkit.models.logprobs import final_hidden, head_chunk, head_logprobs
from alignkit.training.forward import pair_logps, unit_sequence_logps
from tests.conftest import build_model

ROWS = [
    {"prompt": "Add 12 and 30.", "completion": "The answer is 42."},
    {"prompt": "Hello", "completion": "hello there"},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Capital of France?"},
                  {"role": "assistant", "content": "Paris."}]},
    {"text": "Write a short poem about the sea."},
]
PAIRS = [
    {"prompt": "Add 12 and 30.", "chosen": "42", "rejected": "The answer is 43."},
    {"prompt": "Hello ", "chosen": "world", "rejected": "there"},  # plain template: BPE merges across
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Write a short poem."}],
     "chosen": [{"role": "assistant", "content": "The sea is blue."}],
     "rejected": [{"role": "assistant", "content": "No."}]},
]


def sft_rows(tokenizer):
    examples = [to_example(Row(r, f"r{i}")) for i, r in enumerate(ROWS)]
    return tokenize_examples(tokenizer, resolve_template(tokenizer, None), examples, 512)[0]


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_head_logprobs_equal_the_full_log_softmax_with_gradients(softcap, bias):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=bias)
    hidden = torch.randn(37, 16, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    logits = head(hidden)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    full = torch.log_softmax(logits, -1).gather(1, targets[:, None])[:, 0]
    weights = torch.randn(37)
    (full * weights).sum().backward()
    expected = [t.grad.clone() for t in (hidden, head.weight, head.bias) if t is not None]
    for tensor in (hidden, head.weight, head.bias):
        if tensor is not None:
            tensor.grad = None
    chunked = head_logprobs(hidden, head, targets, softcap, chunk_size=8)
    (chunked * weights).sum().backward()
    torch.testing.assert_close(chunked, full, rtol=0, atol=1e-6)
    # the hand-written backward sums in another order than autograd's: equal to fp32 rounding of the largest entry
    for got, want in zip([t.grad for t in (hidden, head.weight, head.bias) if t is not None], expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6 * want.abs().max().item())


def test_chunked_head_skips_the_gradient_of_a_frozen_head_and_sums_chunks_in_float32_under_autocast():
    torch.manual_seed(1)
    head = torch.nn.Linear(64, 500, bias=False)
    hidden = torch.randn(200, 64, requires_grad=True)
    targets = torch.randint(0, 500, (200,))
    hidden64, weight64 = hidden.detach().double().requires_grad_(), head.weight.detach().double().requires_grad_()
    torch.log_softmax(hidden64 @ weight64.T, -1).gather(1, targets[:, None]).sum().backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        head_logprobs(hidden, head, targets, chunk_size=8).sum().backward()
    # bf16 matmuls, float32 softmax and float32 sums over the 25 chunks' weight gradients
    assert (head.weight.grad.double() - weight64.grad).abs().max() < 0.01 * weight64.grad.abs().max()
    assert (hidden.grad.double() - hidden64.grad).abs().max() < 0.01 * hidden64.grad.abs().max()
    head.weight.requires_grad_(False)
    head.weight.grad, hidden.grad = None, None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        head_logprobs(hidden, head, targets, chunk_size=8).sum().backward()
    assert head.weight.grad is None
    assert (hidden.grad.double() - hidden64.grad).abs().max() < 0.01 * hidden64.grad.abs().max()


def test_a_frozen_float32_head_is_cast_once_per_pass_not_once_per_chunk(monkeypatch):
    from alignkit.models import logprobs

    casts = []
    matmul_weight = logprobs._matmul_weight

    def counted(weight):
        used = matmul_weight(weight)
        if used is not weight:
            casts.append(1)
        return used

    monkeypatch.setattr(logprobs, "_matmul_weight", counted)
    torch.manual_seed(3)
    head = torch.nn.Linear(64, 500, bias=False).requires_grad_(False)
    hidden, targets = torch.randn(200, 64, requires_grad=True), torch.randint(0, 500, (200,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = head_logprobs(hidden, head, targets, chunk_size=8)  # 25 chunks
        got.sum().backward()
    assert len(casts) == 2  # one copy for the forward pass, one for the backward pass
    grad, hidden.grad = hidden.grad, None
    cast_head = torch.nn.Linear(64, 500, bias=False).requires_grad_(False)
    cast_head.weight.data = head.weight.detach().to(torch.bfloat16)  # what autocast would cast it to
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = head_logprobs(hidden, cast_head, targets, chunk_size=8)
        expected.sum().backward()
    assert torch.equal(got, expected) and torch.equal(grad, hidden.grad)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(head_logprobs(hidden, head, targets, chunk_size=8), expected)
    assert len(casts) == 3
    hidden.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a retained graph's second backward casts once more
        again = head_logprobs(hidden, head, targets, chunk_size=8).sum()
        again.backward(retain_graph=True)
        again.backward()
    assert len(casts) == 6 and torch.equal(hidden.grad, 2 * grad)


def test_a_chunk_holds_about_the_same_number_of_logits_whatever_the_vocabulary(monkeypatch):
    from alignkit.models import logprobs

    assert [head_chunk(v) for v in (49_152, 151_936, 262_144)] == [682, 220, 128]
    assert head_chunk(10) == 1024 and head_chunk(10 ** 8) == 64
    monkeypatch.setattr(logprobs, "CHUNK_LOGITS", 500 * 70)  # 70 positions per chunk at a 500-token vocabulary
    calls = []
    chunk_logps = logprobs._chunk_logps
    monkeypatch.setattr(logprobs, "_chunk_logps", lambda *args: calls.append(len(args[0])) or chunk_logps(*args))
    torch.manual_seed(2)
    head = torch.nn.Linear(32, 500, bias=False)
    hidden, targets = torch.randn(200, 32), torch.randint(0, 500, (200,))
    with torch.no_grad():
        chunked = head_logprobs(hidden, head, targets)
        assert calls == [70, 70, 60]
        torch.testing.assert_close(chunked, head_logprobs(hidden, head, targets, chunk_size=1024), rtol=0, atol=1e-6)


def test_final_hidden_is_the_models_last_hidden_state_bare_and_under_lora_and_ddp_wrappers(tokenizer):
    from peft import LoraConfig, get_peft_model

    model = build_model(tokenizer)
    input_ids = torch.randint(3, model.config.vocab_size, (2, 7))
    expected = model(input_ids=input_ids, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(final_hidden(model, input_ids), expected, rtol=0, atol=0)

    class Wrapper(torch.nn.Module):  # what DDP and DeepSpeed engines look like from outside: `.module`
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, **kwargs):
            return self.module(**kwargs)

    lora = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    with torch.no_grad():
        expected = lora(input_ids=input_ids, output_hidden_states=True).hidden_states[-1]
        got = final_hidden(Wrapper(lora), input_ids)
    assert not torch.allclose(got, final_hidden(build_model(tokenizer), input_ids))  # the adapter counts
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_best_fit_decreasing_fills_bins():
    # 6 opens a bin, 5 and 4 open their own, 3 tops up the 5 exactly, 2 tops up the 6
    assert packing.best_fit_decreasing([5, 3, 4, 2, 6], 8) == [[4, 3], [0, 1], [2]]


@pytest.mark.parametrize("layout", ["per_sequence", "packed"])
def test_sft_layouts_equal_the_padded_batch_in_value_and_gradient(tokenizer, layout):
    model = build_model(tokenizer)
    rows = sft_rows(tokenizer)

    def run(units):
        model.zero_grad()
        sums = torch.zeros(len(rows))
        counts = torch.zeros(len(rows))
        offset = 0
        for unit in units:
            n = 1 if layout == "per_sequence" and unit is not units_padded[0] else len(rows)
            s, c = unit_sequence_logps(model, unit, n)
            s.sum().backward()
            sums[offset:offset + n] += s.detach()
            counts[offset:offset + n] += c
            offset += n if n == 1 else 0
        return sums, counts, [p.grad.clone() for p in model.parameters()]

    units_padded = [packing.padded(rows, tokenizer.pad_token_id)]
    plain = run(units_padded)
    other = run(packing.sft_units(rows, layout, tokenizer.pad_token_id, capacity=256))
    assert torch.allclose(other[0], plain[0], atol=1e-5) and torch.equal(other[1], plain[1])
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(other[2], plain[2], strict=True))
    # and the old full-logits path agrees too
    batch = units_padded[0]
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    reference, _ = token_logprobs(logits, batch.labels)
    assert torch.allclose(reference.sum(-1).detach(), plain[0], atol=1e-5)


@pytest.mark.parametrize("template", [None, "plain"])
@pytest.mark.parametrize("layout", ["per_sequence", "prefix_shared"])
def test_dpo_layouts_equal_separate_padded_forwards(tokenizer, layout, template):
    model = build_model(tokenizer)
    rows = [Row(p, f"p{i}") for i, p in enumerate(PAIRS)]
    pairs = tokenize_preferences(tokenizer, resolve_template(tokenizer, template), rows, 512)[0]
    plain = pair_logps(model, pairs, "padded", tokenizer.pad_token_id, "cpu")
    other = pair_logps(model, pairs, layout, tokenizer.pad_token_id, "cpu")
    for a, b in zip(plain[:4], other[:4], strict=True):
        assert torch.allclose(a.detach(), b.detach(), atol=1e-5)
    grads = []
    for result in (plain, other):
        model.zero_grad()
        (result[0].sum() - 2 * result[1].sum()).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        if result is plain:
            plain = pair_logps(model, pairs, "padded", tokenizer.pad_token_id, "cpu")
            other = pair_logps(model, pairs, layout, tokenizer.pad_token_id, "cpu")
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(*grads, strict=True))
    if layout == "prefix_shared":
        assert other[4] < plain[4]  # fewer tokens read: the prompt once per pair
