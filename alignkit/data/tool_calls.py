"""Tool calling in conversation rows: the row's tool schemas, the assistant's calls and the tools' results.

Rows come in two forms, both turned into the form Hugging Face chat templates take (`apply_chat_template`'s
`tools=` and messages with `tool_calls`):

- OpenAI / Hugging Face: a row-level `tools` list of JSON schemas, assistant messages with
  `tool_calls: [{type: function, function: {name, arguments}}]` (arguments a JSON object or its JSON text), and
  `tool` messages with the result as `content` (and optionally `tool_call_id`, `name`);
- ShareGPT / LLaMA-Factory: `function_call` turns whose value is the JSON text of `{name, arguments}` (or of a
  list of them), `observation` turns holding a result, and `tools` as a JSON text.

Arguments always reach the template as a JSON object: templates write them with `tojson`, which would quote a
JSON text a second time. A tool schema given bare (`{name, description, parameters}`, LLaMA-Factory's form) is
wrapped as `{type: function, function: ...}`, the form the families' templates were trained on.
"""

from __future__ import annotations

import json
from typing import Any

from alignkit.errors import UserError


def parse_tools(origin: str, value: Any) -> list[dict] | None:
    """The row's `tools` field as a list of `{type: function, function: {...}}` schemas, or None."""
    if isinstance(value, str):
        value = _json(f"{origin}: field 'tools'", value) if value.strip() else None
    if value is None or value == []:
        return None
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise UserError(f"{origin}: field 'tools' must be a list of tool schemas (objects)")
    tools = [t if "function" in t else {"type": "function", "function": t} for t in value]
    for i, tool in enumerate(tools):
        function = tool["function"]
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise UserError(f"{origin}: tools[{i}] has no function name")
    return tools


def tool_names(tools: list[dict] | None) -> set[str] | None:
    return None if tools is None else {t["function"]["name"] for t in tools}


def parse_tool_calls(where: str, value: Any) -> list[dict] | None:
    """An assistant message's `tool_calls` as `[{type: function, function: {name, arguments: {...}}, id?}]`;
    `where` names the field in errors (`FILE:LINE: messages[2].tool_calls`)."""
    if value is None or value == []:
        return None
    if not isinstance(value, list):
        raise UserError(f"{where} must be a list of tool calls, got {type(value).__name__}")
    return [_call(f"{where}[{i}]", item) for i, item in enumerate(value)]


def parse_call_text(where: str, text: str) -> list[dict]:
    """A ShareGPT `function_call` turn's value: the JSON text of one `{name, arguments}` or of a list of them."""
    value = _json(where, text)
    calls = value if isinstance(value, list) else [value]
    if not calls:
        raise UserError(f"{where} holds no tool call")
    return [_call(f"{where}[{i}]" if isinstance(value, list) else where, item) for i, item in enumerate(calls)]


def _call(where: str, item: Any) -> dict:
    if not isinstance(item, dict):
        raise UserError(f"{where} must be an object with 'function': {{name, arguments}}")
    function = item.get("function", item)  # LLaMA-Factory writes {name, arguments} without the wrapper
    if not isinstance(function, dict):
        raise UserError(f"{where}.function must be an object with 'name' and 'arguments'")
    inner = f"{where}.function" if "function" in item else where
    name = function.get("name")
    if not isinstance(name, str) or not name.strip():
        raise UserError(f"{inner}.name must be a tool's name (non-empty text)")
    arguments = function.get("arguments", function.get("parameters", {}))
    if isinstance(arguments, str):
        arguments = _json(f"{inner}.arguments", arguments)
    if not isinstance(arguments, dict):
        raise UserError(f"{inner}.arguments must be a JSON object, got {type(arguments).__name__}")
    call: dict = {"type": "function", "function": {"name": name, "arguments": arguments}}
    if isinstance(item.get("id"), str):
        call["id"] = item["id"]
    return call


def _json(where: str, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{where} is not valid JSON ({err.msg} at character {err.pos})") from None


def check_tool_use(origin: str, name: str, messages: list, tools: list[dict] | None) -> None:
    """Every tool result follows a turn that called a tool (directly or after other results of that turn), a
    result's `tool_call_id` names one of that turn's calls, and every call names one of `tools` when the row
    gives them. `messages` are those of field `name`, in their order in the row."""
    known = tool_names(tools)
    caller = None  # the assistant turn whose calls the following tool results answer
    for i, message in enumerate(messages):
        where = f"{origin}: {name}[{i}]"
        if message.role == "tool":
            _check_result(where, message, caller)
            continue
        caller = message if message.role == "assistant" and message.tool_calls else None
        for k, call in enumerate(message.tool_calls or []):
            called = call["function"]["name"]
            if known is not None and called not in known:
                raise UserError(f"{where}.tool_calls[{k}].function.name: unknown tool {called!r} (the row's "
                                f"tools: {', '.join(sorted(known))})")


def _check_result(where: str, message, caller) -> None:
    if caller is None:
        raise UserError(f"{where}: a tool result with no tool call before it")
    ids = {call["id"] for call in caller.tool_calls if "id" in call}
    if message.tool_call_id is not None and ids and message.tool_call_id not in ids:
        raise UserError(f"{where}.tool_call_id: {message.tool_call_id!r} names none of the calls before it "
                        f"({', '.join(sorted(ids))})")
