"""Every row format gives the exact tokens and loss masks expected, boundaries included."""

from __future__ import annotations

import pytest

from alignkit.data.formats import to_example
from alignkit.data.sources import Row
from alignkit.data.templates import built_in, resolve_template
from alignkit.data.tokenize import IGNORE, tokenize_examples
from alignkit.errors import UserError


def tokenize(tokenizer, fields: dict, template: str | None = None, max_length: int = 512, fmt: str = "auto"):
    example = to_example(Row(fields, "rows.jsonl:1"), fmt)
    rows, stats = tokenize_examples(tokenizer, resolve_template(tokenizer, template), [example], max_length)
    return (rows[0] if rows else None), stats


def trained_text(tokenizer, row) -> list[str]:
    """The trained tokens, decoded one by one (so boundaries between them stay visible)."""
    return [tokenizer.decode([t]) for t, label in zip(row.input_ids, row.labels, strict=True) if label != IGNORE]


def full_text(tokenizer, row) -> str:
    return tokenizer.decode(row.input_ids)


def test_prompt_completion_strings(tokenizer):
    row, _ = tokenize(tokenizer, {"prompt": "Hello", "completion": "The answer is 42."})
    assert full_text(tokenizer, row) == (
        "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\nThe answer is 42.<|im_end|>\n")
    assert "".join(trained_text(tokenizer, row)) == "The answer is 42.<|im_end|>"
    assert trained_text(tokenizer, row)[-1] == "<|im_end|>"  # trained, so the model learns to stop
    assert all(label in (IGNORE, token) for token, label in zip(row.input_ids, row.labels, strict=True))


def test_messages_multi_turn_trains_every_assistant_turn(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "hello there"},
        {"role": "user", "content": "Add 12 and 30."},
        {"role": "assistant", "content": "42"},
    ]
    row, _ = tokenize(tokenizer, {"messages": messages})
    assert full_text(tokenizer, row) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n"
        "<|im_start|>assistant\nhello there<|im_end|>\n<|im_start|>user\nAdd 12 and 30.<|im_end|>\n"
        "<|im_start|>assistant\n42<|im_end|>\n")
    # Trained runs: exactly the two assistant turns, each ending with its end-of-turn token.
    runs, current = [], ""
    for token, label in zip(row.input_ids, row.labels, strict=True):
        if label != IGNORE:
            current += tokenizer.decode([token])
        elif current:
            runs.append(current)
            current = ""
    assert runs == ["hello there<|im_end|>", "42<|im_end|>"]


def test_prompt_as_messages_trains_only_the_completion(tokenizer):
    prompt = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
              {"role": "user", "content": "And?"}]
    row, _ = tokenize(tokenizer, {"prompt": prompt, "completion": [{"role": "assistant", "content": "Paris."}]})
    assert "".join(trained_text(tokenizer, row)) == "Paris.<|im_end|>"


def test_alpaca_with_input_and_system(tokenizer):
    row, _ = tokenize(tokenizer, {"instruction": "Add 12 and 30.", "input": "Show the sum.", "output": "42",
                                  "system": "Be brief."})
    assert full_text(tokenizer, row) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nAdd 12 and 30.\n\nShow the sum.<|im_end|>\n"
        "<|im_start|>assistant\n42<|im_end|>\n")
    assert "".join(trained_text(tokenizer, row)) == "42<|im_end|>"


def test_sharegpt(tokenizer):
    conversations = [{"from": "human", "value": "Hello"}, {"from": "gpt", "value": "hello there"},
                     {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "Bye."}]
    row, _ = tokenize(tokenizer, {"conversations": conversations})
    assert "".join(trained_text(tokenizer, row)) == "hello there<|im_end|>Bye.<|im_end|>"


def test_text_trains_every_token_and_ends_with_eos(tokenizer):
    row, _ = tokenize(tokenizer, {"text": "Hello world"})
    assert trained_text(tokenizer, row) == ["Hello", " world", "<|im_end|>"]


@pytest.mark.parametrize(("prompt", "completion", "expected"), [
    ("Hello ", "world", [" world", "<|im_end|>"]),  # BPE merges the prompt's space into ' world': trained
    ("Hello", " world", [" world", "<|im_end|>"]),  # the same tokens, the same mask
    ("Hello world", "", None),
    ("café", " 你好", [" 你好", "<|im_end|>"]),  # multi-byte characters across the boundary
])
def test_boundary_with_plain_template_where_bpe_merges_across(tokenizer, prompt, completion, expected):
    fields = {"prompt": prompt, "completion": completion}
    if expected is None:
        with pytest.raises(ValueError, match="rows.jsonl:1: field 'completion' is empty"):
            tokenize(tokenizer, fields, template="plain")
        return
    row, _ = tokenize(tokenizer, fields, template="plain")
    assert full_text(tokenizer, row) == prompt + completion + "<|im_end|>"
    assert trained_text(tokenizer, row) == expected


def test_chatml_builtin_matches_the_tokenizers_own(tokenizer):
    fields = {"prompt": "Hello", "completion": "hello there"}
    own, _ = tokenize(tokenizer, fields)
    built, _ = tokenize(tokenizer, fields, template="chatml")
    assert own.input_ids == built.input_ids and own.labels == built.labels
    assert "eos_token" in built_in("plain")


def test_chat_template_from_a_file(tokenizer, tmp_path):
    template = tmp_path / "mine.jinja"
    template.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                        "{% if add_generation_prompt %}[assistant] {% endif %}")
    row, _ = tokenize(tokenizer, {"prompt": "Hello", "completion": "42"}, template=str(template))
    assert full_text(tokenizer, row) == "[user] Hello\n[assistant] 42\n"
    assert "".join(trained_text(tokenizer, row)).strip() == "42"


def test_llama3_template_renders_headers(tokenizer):
    row, _ = tokenize(tokenizer, {"prompt": "Hello", "completion": "42"}, template="llama3")
    assert full_text(tokenizer, row) == (
        "<|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n42<|eot_id|>")
    assert "".join(trained_text(tokenizer, row)) == "42<|eot_id|>"


def test_truncation_cuts_the_completion_and_drops_rows_whose_prompt_fills_max_length(tokenizer):
    fields = {"prompt": "Hello", "completion": "The answer is 42. " * 5}
    full, _ = tokenize(tokenizer, fields)
    cut, stats = tokenize(tokenizer, fields, max_length=len(full.input_ids) - 3)
    assert cut.input_ids == full.input_ids[:-3] and stats.truncated == 1 and stats.dropped == 0
    prompt_len = next(i for i, label in enumerate(full.labels) if label != IGNORE)
    dropped, stats = tokenize(tokenizer, fields, max_length=prompt_len)
    assert dropped is None and stats.dropped == 1 and stats.dropped_origins == ["rows.jsonl:1"]
    kept, stats = tokenize(tokenizer, fields, max_length=prompt_len + 1)
    assert len(kept.input_ids) == prompt_len + 1 and stats.truncated == 1


@pytest.mark.parametrize(("fields", "message"), [
    ({"prompt": "Hi", "completion": 3}, "field 'completion' must be text or a list of messages, got int"),
    ({"messages": "hi"}, "field 'messages' must be a non-empty list"),
    ({"messages": [{"role": "user", "content": "Hi"}]}, "no assistant turn"),
    ({"messages": [{"role": "robot", "content": "Hi"}]}, "messages[0]: unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": 5}]}, "'content' must be text, got int"),
    ({"instruction": "Hi", "output": ""}, "field 'output' is empty"),
    ({"instruction": 7, "output": "x"}, "field 'instruction' must be text, got int"),
    ({"question": "Hi"}, "cannot tell the row format"),
    ({"prompt": "", "completion": "x"}, "field 'prompt' is empty"),
])
def test_bad_rows_name_the_row_and_the_field(tokenizer, fields, message):
    with pytest.raises(ValueError) as caught:
        tokenize(tokenizer, fields)
    assert str(caught.value).startswith("rows.jsonl:1: ") and message in str(caught.value)


def test_rendering_equals_apply_chat_template_for_every_template_shipped_or_tested(tokenizer):
    from pathlib import Path

    from alignkit.data.formats import Message
    from alignkit.data.templates import BUILT_IN
    from alignkit.data.tokenize import render_many

    templates = [built_in(name) for name in BUILT_IN] + [
        p.read_text(encoding="utf-8") for p in (Path(__file__).parent / "templates").glob("*.jinja")]
    chats = [[Message("user", "Hi")], [Message("system", "Be brief."), Message("user", "Hi"),
                                       Message("assistant", "Hello there"), Message("user", "And?")],
             [Message("user", "Q"), Message("assistant", "A")]]
    for template in templates:
        for generation_prompt, chat in ((g, c) for g in (False, True) for c in chats):
            try:
                expected = tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in chat],
                                                         chat_template=template, tokenize=False,
                                                         add_generation_prompt=generation_prompt)
            except Exception as err:  # Mistral's template refuses a system message: so must we, in one line
                with pytest.raises(UserError, match="chat template failed to render"):
                    render_many(tokenizer, template, [chat], generation_prompt)
                assert "alternate" in str(err)
                continue
            assert render_many(tokenizer, template, [chat], generation_prompt) == [expected]
