"""Tool calls and reasoning traces on the families' own chat templates (tests/templates/): the trained text is
exactly each assistant turn as the template renders it at that turn (tool calls included, tool results never),
reasoning trained or left out by train_reasoning; bad tool data is a one-line error naming the row and field."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from alignkit.data.cache import cache_key, load_sft_rows
from alignkit.data.engine import Job
from alignkit.data.formats import to_example
from alignkit.data.prefs import tokenize_preferences
from alignkit.data.sources import Row
from alignkit.data.templates import choose_template
from alignkit.data.tokenize import IGNORE, Rendering, render_many, tokenize_examples
from alignkit.errors import UserError
from tests import family_tokenizers as families
from tests.conftest import write_jsonl

TEMPLATES = Path(__file__).parent / "templates"
WEATHER = {"name": "get_weather", "description": "The weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
TOOLS = [{"type": "function", "function": WEATHER}]


def call(city: str, call_id: str = "call_1") -> dict:
    """A tool call as OpenAI writes it: the arguments as JSON text."""
    return {"id": call_id, "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}


def weather_row(city: str = "Paris", answer_reasoning: str | None = None, call_reasoning: str | None = None) -> dict:
    call_turn = {"role": "assistant", "content": None, "tool_calls": [call(city)]}
    answer_turn = {"role": "assistant", "content": f"It is sunny in {city}."}
    if call_reasoning:
        call_turn["reasoning_content"] = call_reasoning
    if answer_reasoning:
        answer_turn["reasoning_content"] = answer_reasoning
    return {"tools": TOOLS, "messages": [
        {"role": "user", "content": f"What is the weather in {city}?"}, call_turn,
        {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "sunny, 21 C"}, answer_turn]}


QWEN_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
LLAMA_CALL = '{"name": "get_weather", "parameters": {"city": "Paris"}}'


def family_tokenizer(family: dict, template_file: str):
    tokenizer = families.build(family)
    tokenizer.chat_template = (TEMPLATES / template_file).read_text(encoding="utf-8")
    return tokenizer, choose_template(tokenizer, None).source


def rows_of(family: dict, template_file: str, fields: dict, **rendering):
    tokenizer, template = family_tokenizer(family, template_file)
    example = to_example(Row(fields, "rows.jsonl:1"))
    rows, _ = tokenize_examples(tokenizer, template, [example], 2048, Rendering(**rendering))
    return tokenizer, rows


def trained_texts(tokenizer, rows) -> list[str]:
    return [tokenizer.decode(run) for run in families.trained_runs(rows)]


def untrained_text(tokenizer, rows) -> str:
    return "".join(tokenizer.decode([t for t, label in zip(r.input_ids, r.labels, strict=True) if label == IGNORE])
                   for r in rows)


SHAREGPT_ROW = {"tools": json.dumps([WEATHER]), "conversations": [
    {"from": "human", "value": "What is the weather in Paris?"},
    {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
    {"from": "observation", "value": "sunny, 21 C"}, {"from": "gpt", "value": "It is sunny in Paris."}]}

CASES = [
    pytest.param(families.QWEN, "qwen2.5.jinja", weather_row(), {},
                 [f"{QWEN_CALL}<|im_end|>", "It is sunny in Paris.<|im_end|>"], id="qwen2.5-tools"),
    pytest.param(families.QWEN, "qwen2.5.jinja", SHAREGPT_ROW, {},
                 [f"{QWEN_CALL}<|im_end|>", "It is sunny in Paris.<|im_end|>"], id="qwen2.5-sharegpt-function_call"),
    pytest.param(families.LLAMA3, "llama3.1.jinja", weather_row(), {},
                 [f"{LLAMA_CALL}<|eot_id|>", "It is sunny in Paris.<|eot_id|>"], id="llama3.1-tools"),
    pytest.param(families.LLAMA3, "llama3.1.jinja", SHAREGPT_ROW, {},
                 [f"{LLAMA_CALL}<|eot_id|>", "It is sunny in Paris.<|eot_id|>"], id="llama3.1-sharegpt-function_call"),
    # reasoning on both turns: the template keeps it for turns after the last user message, so one row
    pytest.param(families.QWEN, "qwen3.jinja", weather_row(call_reasoning="Ask the tool.",
                                                         answer_reasoning="The tool says sunny."), {},
                 [f"<think>\nAsk the tool.\n</think>\n\n{QWEN_CALL}<|im_end|>",
                  "<think>\nThe tool says sunny.\n</think>\n\nIt is sunny in Paris.<|im_end|>"],
                 id="qwen3-tools-thinking"),
    pytest.param(families.QWEN, "qwen3.jinja", weather_row(call_reasoning="Ask the tool.",
                                                         answer_reasoning="The tool says sunny."),
                 {"train_reasoning": False}, [f"{QWEN_CALL}<|im_end|>", "It is sunny in Paris.<|im_end|>"],
                 id="qwen3-tools-answer-only"),
    # no reasoning: the template writes an empty think block for the last turn only, so each turn is its own row
    pytest.param(families.QWEN, "qwen3.jinja", weather_row(), {},
                 [f"<think>\n\n</think>\n\n{QWEN_CALL}<|im_end|>",
                  "<think>\n\n</think>\n\nIt is sunny in Paris.<|im_end|>"], id="qwen3-tools"),
    # a template without reasoning_content of its own gets the reasoning as a leading think block
    pytest.param(families.QWEN, "qwen2.5.jinja", weather_row(answer_reasoning="The tool says sunny."), {},
                 [f"{QWEN_CALL}<|im_end|>",
                  "<think>\nThe tool says sunny.\n</think>\n\nIt is sunny in Paris.<|im_end|>"],
                 id="qwen2.5-reasoning-inline"),
    pytest.param(families.QWEN, "qwen2.5.jinja", weather_row(answer_reasoning="The tool says sunny."),
                 {"train_reasoning": False}, [f"{QWEN_CALL}<|im_end|>", "It is sunny in Paris.<|im_end|>"],
                 id="qwen2.5-reasoning-inline-answer-only"),
]


@pytest.mark.parametrize(("family", "template_file", "fields", "rendering", "expected"), CASES)
def test_tool_calls_are_trained_as_each_turn_renders_and_tool_results_are_not(family, template_file, fields,
                                                                              rendering, expected):
    tokenizer, rows = rows_of(family, template_file, fields, **rendering)
    assert trained_texts(tokenizer, rows) == expected
    end = tokenizer.convert_tokens_to_ids(expected[0][expected[0].rindex("<"):])
    assert [run[-1] for run in families.trained_runs(rows)] == [end] * len(expected)  # one token
    prompt = untrained_text(tokenizer, rows)
    assert "sunny, 21 C" in prompt and "get_weather" in prompt  # the result and the tools are context only
    assert "What is the weather in Paris?" in prompt


def test_qwen3_reasoning_of_earlier_turns_is_trained_at_its_turn_and_dropped_from_the_history():
    conversation = {"messages": [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "<think>\nGreet back.\n</think>\n\nhello there"},  # inline think block
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris.", "reasoning_content": "France's capital is Paris."}]}
    tokenizer, rows = rows_of(families.QWEN, "qwen3.jinja", conversation)
    assert trained_texts(tokenizer, rows) == ["<think>\nGreet back.\n</think>\n\nhello there<|im_end|>",
                                              "<think>\nFrance's capital is Paris.\n</think>\n\nParis.<|im_end|>"]
    second = tokenizer.decode(rows[1].input_ids)
    assert "<|im_start|>assistant\nhello there<|im_end|>" in second and "Greet back" not in second
    tokenizer, rows = rows_of(families.QWEN, "qwen3.jinja", conversation, train_reasoning=False)
    assert trained_texts(tokenizer, rows) == ["hello there<|im_end|>", "Paris.<|im_end|>"]
    assert "Greet back." in untrained_text(tokenizer, rows[:1])  # in the context, not in the loss


def test_enable_thinking_reaches_the_template():
    reply = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "hello there"}]}
    tokenizer, rows = rows_of(families.QWEN, "qwen3.jinja", reply)
    assert trained_texts(tokenizer, rows) == ["<think>\n\n</think>\n\nhello there<|im_end|>"]
    tokenizer, rows = rows_of(families.QWEN, "qwen3.jinja", reply, enable_thinking=False)
    assert trained_texts(tokenizer, rows) == ["hello there<|im_end|>"]  # the empty block is the template's prompt
    assert tokenizer.decode(rows[0].input_ids).endswith("assistant\n<think>\n\n</think>\n\nhello there<|im_end|>\n")
    thinking = {"messages": [reply["messages"][0], {"role": "assistant", "content": "hello there",
                                                    "reasoning_content": "Greet."}]}
    with pytest.raises(UserError, match="rows.jsonl:1: an assistant turn has reasoning, but with enable_thinking"):
        rows_of(families.QWEN, "qwen3.jinja", thinking, enable_thinking=False)


@pytest.mark.parametrize("template_file", ["qwen2.5.jinja", "qwen3.jinja", "llama3.1.jinja"])
def test_rendering_with_tools_equals_apply_chat_template(template_file):
    family = families.LLAMA3 if template_file.startswith("llama") else families.QWEN
    tokenizer, template = family_tokenizer(family, template_file)
    example = to_example(Row(weather_row(answer_reasoning="Sunny."), "rows.jsonl:1"))
    for generation_prompt, thinking in ((False, None), (True, False), (True, True)):
        extra = {} if thinking is None else {"enable_thinking": thinking}
        chat = [m.template_dict(inline_reasoning=template_file != "qwen3.jinja") for m in example.messages]
        expected = tokenizer.apply_chat_template(chat, tools=TOOLS, chat_template=template, tokenize=False,
                                                 add_generation_prompt=generation_prompt, **extra)
        assert render_many(tokenizer, template, [example.messages], generation_prompt, [TOOLS],
                           Rendering(enable_thinking=thinking)) == [expected]


def test_a_pair_of_tool_calls_trains_the_chosen_and_the_rejected_call():
    tokenizer, template = family_tokenizer(families.QWEN, "qwen2.5.jinja")
    pair = {"tools": TOOLS, "prompt": [{"role": "user", "content": "What is the weather in Paris?"}],
            "chosen": [{"role": "assistant", "content": "", "tool_calls": [call("Paris")]}],
            "rejected": [{"role": "assistant", "content": "", "tool_calls": [call("Rome")]}]}
    same = dict(pair, rejected=[{"role": "assistant", "content": None, "tool_calls": [call("Paris")]}])
    pairs, stats = tokenize_preferences(tokenizer, template, [Row(pair, "p.jsonl:1"), Row(same, "p.jsonl:2")], 2048)
    assert stats.pairs == 1 and stats.identical == 1
    chosen, rejected = (trained_texts(tokenizer, [side]) for side in (pairs[0].chosen, pairs[0].rejected))
    assert chosen == [f"{QWEN_CALL}<|im_end|>"] and rejected == [f"{QWEN_CALL.replace('Paris', 'Rome')}<|im_end|>"]
    assert "get_weather" in untrained_text(tokenizer, [pairs[0].chosen])  # the tools are in both prompts


def with_messages(**changes) -> dict:
    row = weather_row()
    for index, message in changes.items():
        row["messages"][int(index.removeprefix("m"))] = message
    return row


BAD = [
    (with_messages(m1={"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": "{city: Paris}"}}]}),
     "rows.jsonl:1: messages[1].tool_calls[0].function.arguments is not valid JSON (Expecting property name "
     "enclosed in double quotes at character 1)"),
    (with_messages(m1={"role": "assistant", "content": "Let me look."}),
     "rows.jsonl:1: messages[2]: a tool result with no tool call before it"),
    (with_messages(m1={"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "get_wether", "arguments": "{}"}}]}),
     "rows.jsonl:1: messages[1].tool_calls[0].function.name: unknown tool 'get_wether' (the row's tools: "
     "get_weather)"),
    (with_messages(m2={"role": "tool", "tool_call_id": "call_9", "content": "sunny"}),
     "rows.jsonl:1: messages[2].tool_call_id: 'call_9' names none of the calls before it (call_1)"),
    (with_messages(m1={"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": "[1]"}}]}),
     "rows.jsonl:1: messages[1].tool_calls[0].function.arguments must be a JSON object, got list"),
    (dict(SHAREGPT_ROW, conversations=[SHAREGPT_ROW["conversations"][0], {"from": "function_call", "value": "{"}]),
     "rows.jsonl:1: conversations[1].value is not valid JSON (Expecting property name enclosed in double quotes "
     "at character 1)"),
    (dict(weather_row(), tools="[{"), "rows.jsonl:1: field 'tools' is not valid JSON"),
]


@pytest.mark.parametrize(("fields", "message"), BAD)
def test_bad_tool_data_is_a_one_line_error_naming_the_row_and_the_field(fields, message):
    with pytest.raises(UserError) as caught:
        to_example(Row(fields, "rows.jsonl:1"))
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def test_bad_tool_rows_stop_a_run_with_exit_code_2_or_are_skipped_and_counted(tmp_path, capsys):
    from alignkit.cli import main

    tokenizer, template = family_tokenizer(families.QWEN, "qwen2.5.jinja")
    data = write_jsonl(tmp_path / "tools.jsonl", [weather_row()] + [fields for fields, _ in BAD[:3]])
    rows, stats, _ = load_sft_rows([str(data)], "auto", tokenizer, template, 2048, on_bad_row="skip")
    assert len(rows) == 1 and stats.skipped == 3
    assert [r.split(": ")[0] for r in stats.skipped_rows] == [f"{data}:2", f"{data}:3", f"{data}:4"]
    with pytest.raises(UserError, match=re.escape(f"{data}:2: messages[1].tool_calls[0].function.arguments")):
        load_sft_rows([str(data)], "auto", tokenizer, template, 2048)
    model = tool_model(tmp_path / "model")
    assert main(["data", "inspect", str(data), "--model", str(model), "--rows", "0",
                 "--plot", str(tmp_path / "l.png")]) == 0
    assert "3 skipped: bad rows left out" in capsys.readouterr().out
    assert main(["sft", "--model", str(model), "--data", str(data), "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"{data}:2: messages[1].tool_calls[0].function.arguments is not valid JSON" in err
    assert "Traceback" not in err


def test_what_is_trained_is_part_of_the_cache_key(tokenizer, tmp_path):
    data = write_jsonl(tmp_path / "rows.jsonl", [weather_row()])
    keys = {cache_key([str(data)], Job("sft", tokenizer, "T", 64, rendering=Rendering(reasoning, thinking)))
            for reasoning in (True, False) for thinking in (None, True, False)}
    assert len(keys) == 6


def test_data_inspect_marks_tool_calls_and_reasoning_trained_and_tool_results_not(tmp_path, capsys):
    from alignkit.cli import main

    model = tool_model(tmp_path / "model", "qwen3.jinja")
    data = write_jsonl(tmp_path / "tools.jsonl", [weather_row(call_reasoning="Ask the tool.")])
    args = ["data", "inspect", str(data), "--model", str(model), "--color", "never", "--plot", str(tmp_path / "p.png")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"<|im_start|>assistant\n[[<think>\nAsk the tool.\n</think>\n\n{QWEN_CALL}<|im_end|>]]\n" in out
    assert "<|im_start|>user\n<tool_response>\nsunny, 21 C\n</tool_response><|im_end|>\n" in out
    assert main(args + ["--train-reasoning", "false"]) == 0
    out = capsys.readouterr().out
    assert f"<|im_start|>assistant\n<think>\nAsk the tool.\n</think>\n\n[[{QWEN_CALL}<|im_end|>]]\n" in out


# ---------------------------------------------------------------- end to end

def tool_model(folder: Path, template_file: str = "qwen2.5.jinja") -> Path:
    """A tiny random Llama with a Qwen vocabulary and a Qwen template, saved as a user would pass it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    rendered = [QWEN_CALL, json.dumps(TOOLS), "What is the weather in Paris? It is sunny in Paris. Rome"]
    tokenizer = families.build(families.QWEN, vocab_size=600, extra_corpus=rendered * 20)
    tokenizer.chat_template = (TEMPLATES / template_file).read_text(encoding="utf-8")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=None, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_sft_on_tool_calls_then_generate_writes_the_call_it_learnt(tmp_path):
    from alignkit.cli import main

    rows = [weather_row("Paris")]
    data = write_jsonl(tmp_path / "tools.jsonl", rows)
    model = tool_model(tmp_path / "model")
    run = tmp_path / "run"
    assert main(["sft", "--model", str(model), "--data", str(data), "--output-dir", str(run), "--dtype", "fp32",
                 "--max-steps", "60", "--batch-size", "1", "--lr", "1e-2", "--lr-scheduler", "constant"]) == 0
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": row["messages"][:1], "tools": TOOLS}
                                                       for row in rows])
    samples = tmp_path / "samples.jsonl"
    assert main(["generate", "--model", str(run / "final"), "--prompts", str(prompts), "--temperature", "0",
                 "--max-new-tokens", "60", "--output", str(samples)]) == 0
    written = [json.loads(line) for line in samples.read_text().splitlines()]
    calls = [json.loads(re.fullmatch(r"<tool_call>\n(.*)\n</tool_call>", s["completion"], re.S).group(1))
             for s in written]
    assert calls == [{"name": "get_weather", "arguments": {"city": "Paris"}}]
    assert written[0]["tools"] == TOOLS
