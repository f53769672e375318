"""Preference rows for DPO: (prompt, chosen, rejected) → two tokenised sequences sharing the prompt.

Row shapes:
- `prompt`, `chosen`, `rejected` as strings (a user prompt and assistant replies), or as message lists (the
  prompt may be a multi-turn conversation with a system message; chosen/rejected hold assistant messages);
- implicit prompt: only `chosen` and `rejected`, whole conversations; the prompt is their longest common
  message prefix.
A row-level `tools` list is given to the template for both sides, so a pair may prefer one tool call to another
(see `alignkit.data.tool_calls`).
Rows whose chosen equals rejected carry no preference: they are dropped and counted, not errors.
Each sequence is tokenised like an SFT row (see `alignkit.data.tokenize`): the completion's tokens, end-of-turn
token included, are the ones scored.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from alignkit.data.formats import Example, Message, _message_list, row_tools
from alignkit.data.sources import Row
from alignkit.data.tokenize import PLAIN, Rendering, TokenizedRow, TokenizeStats, check_prompt_lengths
from alignkit.errors import UserError


@dataclass
class PreferenceExample:
    origin: str
    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]
    tools: list[dict] | None = None


@dataclass
class PreferenceRow:
    chosen: TokenizedRow
    rejected: TokenizedRow
    origin: str
    position: int = -1  # index in the rows it was read from (precomputed reference log-probs are kept by it)


@dataclass
class PreferenceStats:
    pairs: int = 0
    identical: int = 0
    truncated: int = 0
    dropped: int = 0
    dropped_origins: list[str] = field(default_factory=list)  # the first few
    skipped: int = 0
    skipped_rows: list[str] = field(default_factory=list)


def _side(row: Row, name: str) -> list[Message]:
    if name not in row.fields or row.fields[name] is None:
        raise UserError(f"{row.origin}: missing field '{name}'")
    value = row.fields[name]
    if isinstance(value, str):
        messages = [Message("assistant", value)] if name != "prompt" else [Message("user", value)]
    elif isinstance(value, list):
        messages = _message_list(row, name, value)
    else:
        raise UserError(f"{row.origin}: field '{name}' must be text or a list of messages, got {type(value).__name__}")
    return messages


def _common_prefix(a: list[Message], b: list[Message]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n].key() == b[n].key():
        n += 1
    return n


def to_preference(row: Row) -> PreferenceExample | None:
    """The row as a preference example, or None when chosen and rejected are the same."""
    chosen, rejected = _side(row, "chosen"), _side(row, "rejected")
    if "prompt" in row.fields and row.fields["prompt"] is not None:
        prompt = _side(row, "prompt")
    else:  # implicit prompt: the shared start of two conversations
        shared = _common_prefix(chosen, rejected)
        while shared and chosen[shared - 1].role == "assistant":
            shared -= 1  # the completions start at the first assistant turn after the shared context
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
        if not prompt:
            raise UserError(f"{row.origin}: chosen and rejected share no prompt; add a 'prompt' field")
    if not prompt or all(m.is_empty() for m in prompt):
        raise UserError(f"{row.origin}: field 'prompt' is empty")
    for name, side in (("chosen", chosen), ("rejected", rejected)):
        if not side or all(m.is_empty() for m in side):
            raise UserError(f"{row.origin}: field '{name}' is empty")
        if any(m.role != "assistant" for m in side):
            raise UserError(f"{row.origin}: field '{name}' may hold assistant messages only after the prompt")
    if [m.key() for m in chosen] == [m.key() for m in rejected]:
        return None
    return PreferenceExample(row.origin, prompt, chosen, rejected, row_tools(row))


def as_example(origin: str, prompt: list[Message], completion: list[Message], tools: list[dict] | None = None
               ) -> Example:
    """One side of a pair as an SFT example: the prompt untrained, the completion trained."""
    context = [replace(m, train=False) for m in prompt]
    return Example(origin, messages=context + [replace(m, train=True) for m in completion], tools=tools)


def tokenize_preferences(tokenizer, template: str, rows: list[Row], max_length: int, on_bad_row: str = "error",
                         rendering: Rendering = PLAIN) -> tuple[list[PreferenceRow], PreferenceStats]:
    """Pairs of `rows` as Python lists (for small sets: evaluation, tests); training uses `data.cache`."""
    from alignkit.data.engine import Job, encode_rows

    pairs, stats = encode_rows(Job("dpo", tokenizer, template, max_length, "auto", on_bad_row, rendering), rows)
    check_prompt_lengths(TokenizeStats(dropped=stats.dropped, dropped_origins=stats.dropped_origins), max_length,
                         on_bad_row)
    return pairs, stats
