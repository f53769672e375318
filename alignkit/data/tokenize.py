"""Conversations → token ids and labels, with the prompt/completion boundary found exactly.

The whole conversation is rendered once and tokenised once. A trained span is the text an assistant turn adds
to the conversation before it (ending with the end-of-turn token, trailing whitespace excluded); a token is
trained when its characters overlap a trained span. A BPE token that merges the last prompt character with the
first completion character is therefore trained: the model must predict it to produce the completion.

Truncation policy (`max_length`): a row longer than max_length keeps its first max_length tokens (the completion
is cut from the end); a row with no trained token among them (its prompt alone fills max_length) is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from alignkit.data.formats import Example, Message
from alignkit.errors import UserError

IGNORE = -100  # label of tokens that are not trained (torch's cross-entropy ignore_index)


@dataclass
class TokenizedRow:
    input_ids: list[int]
    labels: list[int]  # == input_ids where trained, IGNORE elsewhere (not yet shifted)
    origin: str


@dataclass
class TokenizeStats:
    rows: int = 0
    truncated: int = 0
    dropped: int = 0
    dropped_origins: list[str] = field(default_factory=list)
    truncated_origins: list[str] = field(default_factory=list)
    skipped: int = 0  # bad rows left out under on_bad_row: skip
    skipped_rows: list[str] = field(default_factory=list)  # "origin: what is wrong", the first few


def trained_label_count(rows: list[TokenizedRow]) -> int:
    """Tokens that enter the loss: labels after the shift (position t predicts token t+1)."""
    return sum(sum(1 for label in r.labels[1:] if label != IGNORE) for r in rows)


def merge_stats(parts: list[TokenizeStats]) -> TokenizeStats:
    """The statistics of several sources tokenised apart, as if they were one."""
    merged = TokenizeStats()
    for part in parts:
        for name, value in vars(part).items():
            setattr(merged, name, getattr(merged, name) + value)
    return merged


def render(tokenizer, template: str, messages: list[Message], add_generation_prompt: bool = False) -> str:
    conversation = [{"role": m.role, "content": m.content} for m in messages]
    try:
        return tokenizer.apply_chat_template(conversation, chat_template=template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as err:  # jinja raises TemplateError, templates may raise their own exceptions
        raise UserError(f"chat template failed to render: {err}") from None


def trained_spans(tokenizer, template: str, example: Example) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its trained assistant turns."""
    messages = example.messages
    assert messages is not None
    full = render(tokenizer, template, messages)
    spans = []
    for i, message in enumerate(messages):
        if not message.train:
            continue
        before = render(tokenizer, template, messages[:i], add_generation_prompt=True)
        through = render(tokenizer, template, messages[: i + 1])
        if not (through.startswith(before) and full.startswith(through)):
            raise UserError(f"{example.origin}: the chat template renders a conversation differently from its "
                            "own prefix, so turn boundaries cannot be found (try chat_template: chatml)")
        spans.append((len(before), len(through.rstrip())))
    return full, spans


def _is_trained(start: int, end: int, spans: list[tuple[int, int]]) -> bool:
    for lo, hi in spans:
        if start < hi and end > lo:
            return True
        if start == end and lo <= start < hi:  # zero-width tokens inside a span
            return True
    return False


def check_prompt_lengths(stats: TokenizeStats, max_length: int, on_bad_row: str) -> None:
    """Under on_bad_row: error, a row whose prompt alone fills max_length stops the run before training."""
    if stats.dropped and on_bad_row == "error":
        raise UserError(f"{stats.dropped_origins[0]}: the prompt alone fills max_length={max_length} tokens "
                        f"({stats.dropped} rows like this); raise --max-length or pass --on-bad-row skip")


def convert_rows(rows: list, convert, on_bad_row: str, stats: TokenizeStats, keep: int = 5) -> list:
    """`convert` applied to each row; bad rows raise (error) or are counted and left out (skip)."""
    converted = []
    for row in rows:
        try:
            converted.append(convert(row))
        except UserError as err:
            if on_bad_row != "skip":
                raise
            stats.skipped += 1
            if len(stats.skipped_rows) < keep:
                stats.skipped_rows.append(str(err))
    return converted


def tokenize_examples(tokenizer, template: str, examples: list[Example], max_length: int
                      ) -> tuple[list[TokenizedRow], TokenizeStats]:
    if not tokenizer.is_fast:
        raise UserError("alignkit needs a fast (Rust) tokenizer to locate completion tokens exactly")
    texts, spans_per_row = [], []
    for example in examples:
        if example.text is not None:
            texts.append(example.text + (tokenizer.eos_token or ""))
            spans_per_row.append(None)  # language modelling: every token is trained
        else:
            text, spans = trained_spans(tokenizer, template, example)
            texts.append(text)
            spans_per_row.append(spans)
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    stats = TokenizeStats()
    rows = []
    for example, ids, offsets, spans in zip(examples, encoded["input_ids"], encoded["offset_mapping"],
                                            spans_per_row, strict=True):
        if spans is None:
            labels = list(ids)
        else:
            labels = [t if _is_trained(s, e, spans) else IGNORE for t, (s, e) in zip(ids, offsets, strict=True)]
        if len(ids) > max_length:
            ids, labels = ids[:max_length], labels[:max_length]
            if all(label == IGNORE for label in labels):
                stats.dropped += 1
                stats.dropped_origins.append(example.origin)
                continue
            stats.truncated += 1
            stats.truncated_origins.append(example.origin)
        rows.append(TokenizedRow(list(ids), labels, example.origin))
    stats.rows = len(rows)
    return rows, stats
