"""Row formats for SFT: every row becomes a list of chat messages, each marked trained or not.

| format              | row fields                                              | trained tokens            |
|---------------------|---------------------------------------------------------|---------------------------|
| `prompt_completion` | `prompt`, `completion` (strings or message lists)       | the completion's messages |
| `messages`          | `messages`: [{role, content}] system/user/assistant     | every assistant turn      |
| `alpaca`            | `instruction`, `output`, optional `input` and `system`  | `output`                  |
| `sharegpt`          | `conversations`: [{from, value}] (human/gpt/system)     | every gpt turn            |
| `text`              | `text`                                                  | every token (+ eos)       |

Conversations exported from chat services (`messages` and `sharegpt` rows) are repaired by fixed rules, each
repair counted and reported rather than the row refused: empty turns are left out, turns before the first user
turn that are not the system message are left out (dumps often open with the assistant's greeting), and
consecutive turns of one role are merged into one, joined by a blank line.

Conversations may call tools (`alignkit.data.tool_calls`: a row's `tools`, assistant `tool_calls`, `tool` results;
ShareGPT's `function_call` and `observation` turns) and reason (an assistant turn's `reasoning_content`, or a
`<think>...</think>` block opening its content). Tool results are never trained; a tool-calling turn is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from alignkit.data.sources import Row
from alignkit.data.tool_calls import check_tool_use, parse_call_text, parse_tool_calls, parse_tools
from alignkit.errors import UserError

FORMATS = ("prompt_completion", "messages", "alpaca", "sharegpt", "text")
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "function_call": "assistant",
                  "observation": "tool", "tool": "tool"}
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


@dataclass
class Message:
    role: str
    content: str
    train: bool = False
    tool_calls: list[dict] | None = None  # [{type: function, function: {name, arguments: {...}}, id?}]
    reasoning: str | None = None  # the `reasoning_content` field (an inline <think> block stays in content)
    tool_call_id: str | None = None  # a tool result's: which call it answers
    name: str | None = None  # a tool result's: the tool's name

    def is_empty(self) -> bool:
        """No text, call or reasoning; a tool result is never empty (an empty result is still the answer)."""
        return self.role != "tool" and not self.content.strip() and not self.tool_calls and not self.reasoning

    def key(self) -> tuple:
        """What the model sees of the message, to compare two (the train mark left out)."""
        return (self.role, self.content, json.dumps(self.tool_calls, sort_keys=True), self.reasoning,
                self.tool_call_id, self.name)

    def reasoning_text(self) -> str | None:
        """The turn's reasoning: its `reasoning_content`, else a <think> block its content opens with."""
        if self.reasoning is not None:
            return self.reasoning
        text = self.content.lstrip()
        if self.role != "assistant" or not text.startswith(THINK_OPEN) or THINK_CLOSE not in text:
            return None
        return text[len(THINK_OPEN):text.index(THINK_CLOSE)]

    def template_dict(self, inline_reasoning: bool = False) -> dict:
        """The message as chat templates take it; keys it does not use are left out (Llama 3.1's template
        tests `'tool_calls' in message`). `inline_reasoning`: the reasoning written as a <think> block before
        the content, for templates that do not render `reasoning_content` themselves."""
        out: dict = {"role": self.role, "content": self.content}
        if self.reasoning is not None and inline_reasoning:
            block = f"{THINK_OPEN}\n{self.reasoning.strip()}\n{THINK_CLOSE}"
            out["content"] = f"{block}\n\n{self.content}" if self.content else block
        elif self.reasoning is not None:
            out["reasoning_content"] = self.reasoning
        for name in ("tool_calls", "tool_call_id", "name"):
            if getattr(self, name):
                out[name] = getattr(self, name)
        return out


@dataclass
class Example:
    """One training example: a conversation to render with the chat template, or raw text."""

    origin: str
    messages: list[Message] | None = None
    text: str | None = None
    repairs: list[str] = field(default_factory=list)  # what the repair rules changed, for the log
    tools: list[dict] | None = None  # the row's tool schemas, passed to the template as `tools`


def detect_format(row: Row) -> str:
    keys = row.fields.keys()
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if "prompt" in keys and "completion" in keys:
        return "prompt_completion"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    if "text" in keys:
        return "text"
    if "prompt" in keys and not {"chosen", "rejected"} & set(keys):
        raise UserError(f"{row.origin}: missing field 'completion'")
    if "chosen" in keys or "rejected" in keys:
        raise UserError(f"{row.origin}: a preference row (chosen/rejected): train it with 'alignkit dpo'")
    found = ", ".join(sorted(map(str, keys))) or "none"
    raise UserError(f"{row.origin}: cannot tell the row format from its fields ({found}); expected messages, "
                    "conversations, prompt+completion, instruction+output or text")


def to_example(row: Row, data_format: str = "auto") -> Example:
    fmt = detect_format(row) if data_format == "auto" else data_format
    convert = {"prompt_completion": _prompt_completion, "messages": _messages, "alpaca": _alpaca,
               "sharegpt": _sharegpt, "text": _text}[fmt]
    example = convert(row)
    if example.messages is not None:
        example.tools = row_tools(row)
    if fmt in ("messages", "sharegpt"):
        _repair(example)
    if example.messages is not None:
        _check_conversation(example)
    return example


def _field(row: Row, name: str, optional: bool = False) -> Any:
    if name not in row.fields or row.fields[name] is None:
        if optional:
            return None
        raise UserError(f"{row.origin}: missing field '{name}'")
    return row.fields[name]


def _text_field(row: Row, name: str, optional: bool = False, allow_empty: bool = False) -> str | None:
    value = _field(row, name, optional)
    if value is None:
        return None
    if not isinstance(value, str):
        raise UserError(f"{row.origin}: field '{name}' must be text, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise UserError(f"{row.origin}: field '{name}' is empty")
    return value


def row_tools(row: Row) -> list[dict] | None:
    return parse_tools(row.origin, row.fields.get("tools"))


def _message_list(row: Row, name: str, value: Any, role_key: str = "role", content_key: str = "content",
                  roles: dict[str, str] | None = None) -> list[Message]:
    if not isinstance(value, list) or not value:
        kind = type(value).__name__
        raise UserError(f"{row.origin}: field '{name}' must be a non-empty list of messages, got {kind}")
    roles = roles or {r: r for r in ROLES}
    messages = [_message(f"{row.origin}: {name}[{i}]", item, role_key, content_key, roles)
                for i, item in enumerate(value)]
    check_tool_use(row.origin, name, messages, row_tools(row))
    return messages


def _message(where: str, item: Any, role_key: str, content_key: str, roles: dict[str, str]) -> Message:
    if not isinstance(item, dict):
        raise UserError(f"{where} must be an object with '{role_key}' and '{content_key}'")
    given, content = item.get(role_key), item.get(content_key)
    if not isinstance(given, str) or given not in roles:
        raise UserError(f"{where}: unknown role {_short(given)} (use {', '.join(roles)})")
    role = roles[given]
    if given == "function_call":  # ShareGPT: the turn's value is the call itself
        if not isinstance(content, str):
            raise UserError(f"{where}: '{content_key}' must be text, got {type(content).__name__}")
        return Message(role, "", tool_calls=parse_call_text(f"{where}.{content_key}", content))
    calls = parse_tool_calls(f"{where}.tool_calls", item.get("tool_calls"))
    if calls and role != "assistant":
        raise UserError(f"{where}: only assistant turns call tools (role {role!r} has tool_calls)")
    if content is None and calls:  # OpenAI writes null content beside tool calls
        content = ""
    if role == "tool" and isinstance(content, (dict, list)):  # a structured result is passed on as its JSON
        content = json.dumps(content, ensure_ascii=False)
    if not isinstance(content, str):
        raise UserError(f"{where}: '{content_key}' must be text, got {type(content).__name__}")
    extra = {name: item.get(name) for name in ("reasoning_content", "tool_call_id", "name")}
    for name, value in extra.items():
        if value is not None and not isinstance(value, str):
            raise UserError(f"{where}: '{name}' must be text, got {type(value).__name__}")
    if extra["reasoning_content"] is not None and role != "assistant":
        raise UserError(f"{where}: only assistant turns carry reasoning_content")
    tool_fields = {"tool_call_id": extra["tool_call_id"], "name": extra["name"]} if role == "tool" else {}
    return Message(role, content, tool_calls=calls, reasoning=extra["reasoning_content"], **tool_fields)


def _short(value: Any) -> str:
    """A value as shown in an error: its repr, cut to stay one short line."""
    text = " ".join(repr(value).split())
    return text if len(text) <= 60 else text[:57] + "..."


def _prompt_completion(row: Row) -> Example:
    prompt, completion = _field(row, "prompt"), _field(row, "completion")
    for name, value in (("prompt", prompt), ("completion", completion)):
        if not isinstance(value, (str, list)):
            raise UserError(f"{row.origin}: field '{name}' must be text or a list of messages, "
                            f"got {type(value).__name__}")
    if isinstance(prompt, str):
        if not prompt.strip():
            raise UserError(f"{row.origin}: field 'prompt' is empty")
        prompt_messages = [Message("user", prompt)]
    else:
        prompt_messages = _message_list(row, "prompt", prompt)
    if isinstance(completion, str):
        completion_messages = [Message("assistant", completion)]
    else:
        completion_messages = _message_list(row, "completion", completion)
    for message in completion_messages:
        if message.role != "assistant":
            raise UserError(f"{row.origin}: field 'completion' may hold assistant messages only, got {message.role!r}")
        if message.is_empty():
            raise UserError(f"{row.origin}: field 'completion' is empty")
        message.train = True
    return Example(row.origin, messages=prompt_messages + completion_messages)


def _messages(row: Row) -> Example:
    messages = _message_list(row, "messages", _field(row, "messages"))
    for message in messages:
        message.train = message.role == "assistant"
    return Example(row.origin, messages=messages)


def _alpaca(row: Row) -> Example:
    instruction = _text_field(row, "instruction")
    extra = _text_field(row, "input", optional=True, allow_empty=True)
    output = _text_field(row, "output")
    system = _text_field(row, "system", optional=True, allow_empty=True)
    user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    messages = [Message("system", system)] if system and system.strip() else []
    messages += [Message("user", user), Message("assistant", output, train=True)]
    return Example(row.origin, messages=messages)


def _sharegpt(row: Row) -> Example:
    messages = _message_list(row, "conversations", _field(row, "conversations"), "from", "value", SHAREGPT_ROLES)
    system = _text_field(row, "system", optional=True, allow_empty=True)
    if system and system.strip() and messages[0].role != "system":
        messages.insert(0, Message("system", system))
    for message in messages:
        message.train = message.role == "assistant"
    return Example(row.origin, messages=messages)


def _text(row: Row) -> Example:
    return Example(row.origin, text=_text_field(row, "text"))


def _repair(example: Example) -> None:
    """The repair rules of the module docstring, applied in that order."""
    messages = example.messages
    assert messages is not None
    kept = [m for m in messages if not m.is_empty()]
    if len(kept) < len(messages):
        example.repairs.append(f"left out {len(messages) - len(kept)} empty turns")
    first_user = next((i for i, m in enumerate(kept) if m.role == "user"), 0)  # none: the check says so
    opening = [m for m in kept[:first_user] if m.role != "system" or m is not kept[0]]
    if opening:
        example.repairs.append(f"left out {len(opening)} {opening[0].role} turns before the first user turn")
        kept = [m for m in kept if not any(m is o for o in opening)]
    merged: list[Message] = []
    for message in kept:
        if merged and _mergeable(merged[-1], message):
            last = merged[-1]
            text = "\n\n".join(t for t in (last.content, message.content) if t.strip())
            merged[-1] = Message(last.role, text, last.train or message.train, tool_calls=message.tool_calls,
                                 reasoning=last.reasoning)
        else:
            merged.append(message)
    if len(merged) < len(kept):
        example.repairs.append(f"merged {len(kept) - len(merged)} turns into the turn of the same role before them")
    example.messages = merged


def _mergeable(first: Message, second: Message) -> bool:
    """Two turns of one role that read as one: never system or tool turns (each result answers its own call),
    and only where the merged turn keeps the order a template writes (reasoning, text, then calls)."""
    return (first.role == second.role and first.role not in ("system", "tool") and not first.tool_calls
            and second.reasoning is None)


def _check_conversation(example: Example) -> None:
    messages = example.messages
    assert messages is not None
    if not any(m.train for m in messages):
        raise UserError(f"{example.origin}: no assistant turn to train on")
    for m in messages:
        if m.train and m.is_empty():
            raise UserError(f"{example.origin}: an assistant turn is empty")
    first = next((m for m in messages if m.role != "system"), None)
    if first is None or first.role != "user":
        raise UserError(f"{example.origin}: the conversation needs a user turn before its first assistant turn")
    for m in messages:
        if m.role == "system" and m is not messages[0]:
            raise UserError(f"{example.origin}: a system message may only come first")
