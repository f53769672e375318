"""The families' own chat templates (tests/templates/, as each model ships it): the trained text of a
conversation is exactly each assistant reply and its end-of-turn token, nothing of the system or user turns."""

from __future__ import annotations

from pathlib import Path

import pytest

from alignkit.data.formats import Example, Message
from alignkit.data.prefs import tokenize_preferences
from alignkit.data.sources import Row
from alignkit.data.templates import choose_template
from alignkit.data.tokenize import tokenize_examples
from tests import family_tokenizers as families

TEMPLATES = Path(__file__).parent / "templates"
SYSTEM = [("system", "Be brief.")]
TWO_TURNS = [("user", "Hello"), ("assistant", "hello there"), ("user", "What is the capital of France?"),
             ("assistant", "Paris.")]
QWEN3_REASONING = "Because France's capital is Paris."

def rows_of(family: dict, template_file: str, conversation: list[tuple[str, str]]):
    tokenizer = families.build(family)
    tokenizer.chat_template = (TEMPLATES / template_file).read_text(encoding="utf-8")
    template = choose_template(tokenizer, None).source
    messages = [Message(role, text, train=role == "assistant") for role, text in conversation]
    rows, _ = tokenize_examples(tokenizer, template, [Example("rows.jsonl:1", messages=messages)], 1024)
    return tokenizer, rows


CASES = [
    pytest.param(families.QWEN, "qwen2.5.jinja", SYSTEM + TWO_TURNS, ["hello there<|im_end|>", "Paris.<|im_end|>"],
                 id="qwen2.5"),
    pytest.param(families.QWEN, "qwen2.5.jinja", TWO_TURNS, ["hello there<|im_end|>", "Paris.<|im_end|>"],
                 id="qwen2.5-default-system"),
    pytest.param(families.GEMMA, "gemma3.jinja", SYSTEM + TWO_TURNS, ["hello there<end_of_turn>",
                                                                      "Paris.<end_of_turn>"], id="gemma3"),
    pytest.param(families.LLAMA3, "llama3.1.jinja", SYSTEM + TWO_TURNS, ["hello there<|eot_id|>",
                                                                         "Paris.<|eot_id|>"], id="llama3.1"),
    pytest.param(families.MISTRAL, "mistral-v0.1.jinja", TWO_TURNS, ["hello there</s>", "Paris.</s>"],
                 id="mistral"),
    pytest.param(families.QWEN, "qwen3.jinja", SYSTEM + TWO_TURNS[:2],
                 ["<think>\n\n</think>\n\nhello there<|im_end|>"], id="qwen3-one-turn"),
    pytest.param(families.QWEN, "qwen3.jinja",
                 SYSTEM + [("user", "Hello"), ("assistant", f"<think>\n{QWEN3_REASONING}\n</think>\n\nParis.")],
                 [f"<think>\n{QWEN3_REASONING}\n</think>\n\nParis.<|im_end|>"], id="qwen3-one-turn-reasoning"),
    pytest.param(families.QWEN, "qwen3.jinja", SYSTEM + TWO_TURNS,
                 ["<think>\n\n</think>\n\nhello there<|im_end|>", "<think>\n\n</think>\n\nParis.<|im_end|>"],
                 id="qwen3-two-turns"),
    # Phi-3 writes eos only after the very last message: not part of any turn, so not trained
    pytest.param(families.PHI3, "phi3.jinja", SYSTEM + TWO_TURNS[:2], ["hello there<|end|>"], id="phi3-one-turn"),
    pytest.param(families.PHI3, "phi3.jinja", SYSTEM + TWO_TURNS, ["hello there<|end|>", "Paris.<|end|>"],
                 id="phi3-two-turns"),
]


@pytest.mark.parametrize(("family", "template_file", "conversation", "expected"), CASES)
def test_only_each_reply_and_its_end_of_turn_token_are_trained(family, template_file, conversation, expected):
    tokenizer, rows = rows_of(family, template_file, conversation)
    runs = families.trained_runs(rows)
    assert [tokenizer.decode(r) for r in runs] == expected
    end = tokenizer.convert_tokens_to_ids(expected[0][expected[0].rindex("<"):])
    assert [r[-1] for r in runs] == [end] * len(expected)  # one token, not pieces of text
    for row in rows:
        if family["add_bos"]:  # bos once, first, as the model's tokenizer adds it
            assert row.input_ids[0] == tokenizer.bos_token_id
            assert row.input_ids.count(tokenizer.bos_token_id) == 1


def test_qwen3_multi_turn_conversations_become_one_row_per_turn_in_the_context_it_was_written_in():
    """Qwen3 renders earlier replies without their reasoning once a later user turn follows, so each trained turn
    becomes its own row: the conversation through that turn, only that turn trained."""
    tokenizer, rows = rows_of(families.QWEN, "qwen3.jinja", SYSTEM + TWO_TURNS)
    first, second = (tokenizer.decode(r.input_ids) for r in rows)
    assert len(rows) == 2 and first.endswith("<think>\n\n</think>\n\nhello there<|im_end|>\n")
    assert "What is the capital" not in first
    assert "<|im_start|>assistant\nhello there<|im_end|>" in second  # as the history renders it: no think block
    assert [len(runs) for runs in (families.trained_runs([r]) for r in rows)] == [1, 1]
    pairs, _ = tokenize_preferences(*_qwen3_pair())  # the earlier reply is prompt: a pair needs no split
    assert [tokenizer.decode(run) for p in pairs for run in families.trained_runs([p.chosen, p.rejected])] == [
        "<think>\n\n</think>\n\nParis.<|im_end|>", "<think>\n\n</think>\n\nRome.<|im_end|>"]


def _qwen3_pair():
    tokenizer = families.build(families.QWEN)
    tokenizer.chat_template = (TEMPLATES / "qwen3.jinja").read_text(encoding="utf-8")
    turns = [{"role": r, "content": c} for r, c in TWO_TURNS]
    row = Row({"chosen": turns, "rejected": turns[:3] + [{"role": "assistant", "content": "Rome."}]}, "p.jsonl:1")
    return tokenizer, choose_template(tokenizer, None).source, [row], 1024
