"""Conversations → token ids and labels, with the prompt/completion boundary found exactly.

The whole conversation is rendered once and tokenised once. A trained span is the text an assistant turn adds
to the conversation before it, as that turn renders when the conversation goes on after it: it ends with the
end-of-turn token, and what a template writes only after the very last message (Phi-3's eos) and trailing
whitespace are left out. A token is trained when its characters overlap a trained span, so a BPE token that
merges the last prompt character with the first completion character is trained: the model must predict it to
produce the completion.

Truncation policy (`max_length`): a row longer than max_length keeps its first max_length tokens (the completion
is cut from the end); a row with no trained token among them (its prompt alone fills max_length) is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from alignkit.data.formats import Example, Message
from alignkit.errors import UserError

IGNORE = -100  # label of tokens that are not trained (torch's cross-entropy ignore_index)
KEEP = 5  # origins of dropped, truncated, skipped and repaired rows named in the statistics, the first few


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
    dropped_origins: list[str] = field(default_factory=list)  # the first few
    truncated_origins: list[str] = field(default_factory=list)  # the first few
    skipped: int = 0  # bad rows left out under on_bad_row: skip
    skipped_rows: list[str] = field(default_factory=list)  # "origin: what is wrong", the first few
    repaired: int = 0  # rows changed by the conversation repair rules (see `alignkit.data.formats`)
    repaired_rows: list[str] = field(default_factory=list)  # "origin: what was changed", the first few


def trained_label_count(rows) -> int:
    """Tokens that enter the loss: labels after the shift (position t predicts token t+1)."""
    if hasattr(rows, "trained_counts"):  # stored rows know their counts without reading their tokens
        return int(rows.trained_counts().sum())
    return sum(sum(1 for label in r.labels[1:] if label != IGNORE) for r in rows)


def merge_stats(parts: list[TokenizeStats]) -> TokenizeStats:
    """The statistics of several sources or chunks tokenised apart, as if they were one."""
    merged = TokenizeStats()
    for part in parts:
        for name, value in vars(part).items():
            total = getattr(merged, name) + value
            setattr(merged, name, total[:KEEP] if isinstance(total, list) else total)
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
        through = _turn_in_context(tokenizer, template, messages[: i + 1])
        if not (through.startswith(before) and full.startswith(through) and len(through) > len(before)):
            raise NotAPrefix(f"{example.origin}: the chat template renders a conversation differently from its "
                             "own prefix, so turn boundaries cannot be found (try chat_template: chatml)")
        spans.append((len(before), len(through.rstrip())))
    return full, spans


class NotAPrefix(UserError):
    """A turn renders differently once later turns follow it."""


def renderings(tokenizer, template: str, example: Example, split: bool = True) -> list[tuple[str, list]]:
    """The example's rendered text and trained spans; with `split`, one per trained turn where the template
    renders earlier turns differently once later turns follow (Qwen3 drops their reasoning from the history):
    each turn is then trained in the context the model has when it writes it, the conversation through it."""
    try:
        return [trained_spans(tokenizer, template, example)]
    except NotAPrefix:
        messages = example.messages
        assert messages is not None
        turns = [i for i, m in enumerate(messages) if m.train]
        if not split or len(turns) < 2:
            raise
        return [trained_spans(tokenizer, template, Example(example.origin, messages=[
            Message(m.role, m.content, train=k == i) for k, m in enumerate(messages[:i + 1])])) for i in turns]


def _turn_in_context(tokenizer, template: str, messages: list[Message]) -> str:
    """The conversation through its last message, as it renders with more conversation after it: the common
    start of its rendering alone and with the generation prompt of a next turn."""
    alone = render(tokenizer, template, messages)
    followed = render(tokenizer, template, messages, add_generation_prompt=True)
    same = next((k for k, (a, b) in enumerate(zip(alone, followed, strict=False)) if a != b), min(len(alone),
                                                                                                  len(followed)))
    for token in tokenizer.get_added_vocab():  # "<|endoftext|>" and "<|assistant|>" share "<|": not a turn's
        at = alone.find(token, max(0, same - len(token) + 1), same + len(token))
        if at != -1 and at < same:
            same = at
    return alone[:same]


def check_prompt_lengths(stats: TokenizeStats, max_length: int, on_bad_row: str) -> None:
    """Under on_bad_row: error, a row whose prompt alone fills max_length stops the run before training."""
    if stats.dropped and on_bad_row == "error":
        raise UserError(f"{stats.dropped_origins[0]}: the prompt alone fills max_length={max_length} tokens "
                        f"({stats.dropped} rows like this); raise --max-length or pass --on-bad-row skip")


def convert_rows(rows, convert, on_bad_row: str, stats: TokenizeStats) -> list:
    """`convert` applied to each row; bad rows raise (error) or are counted and left out (skip)."""
    converted = []
    for row in rows:
        try:
            converted.append(convert(row))
        except UserError as err:
            if on_bad_row != "skip":
                raise
            stats.skipped += 1
            _keep(stats.skipped_rows, str(err))
    return converted


@dataclass
class Encoded:
    """One example as token arrays: ids, which of them are trained, and whether max_length cut it."""

    ids: np.ndarray  # int64
    trained: np.ndarray  # bool, per token (not yet shifted)
    truncated: bool


def encode_examples(tokenizer, template: str, examples: list[Example], max_length: int, split: bool = True
                    ) -> list[list[Encoded | None]]:
    """Each example's rows (one, or one per trained turn: see `renderings`), each row its tokens or None when
    its prompt alone fills max_length (nothing left to train).

    The fast tokenizer encodes a batch of rendered texts at once and each encoding is cut to max_length before
    its ids and offsets become Python objects, so the tokens past max_length never leave the tokenizer."""
    if not tokenizer.is_fast:
        raise UserError("alignkit needs a fast (Rust) tokenizer to locate completion tokens exactly")
    texts, spans_per_row, owners = [], [], []
    for number, example in enumerate(examples):
        if example.text is not None:
            parts = [(example.text + (tokenizer.eos_token or ""), None)]  # language modelling: all trained
        else:
            parts = renderings(tokenizer, template, example, split)
        for text, spans in parts:
            texts.append(text)
            spans_per_row.append(spans)
            owners.append(number)
    encoded: list[list[Encoded | None]] = [[] for _ in examples]
    for encoding, spans, owner in zip(tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False),
                                      spans_per_row, owners, strict=True):
        truncated = len(encoding) > max_length
        if truncated:
            encoding.truncate(max_length)
        ids = np.asarray(encoding.ids, dtype=np.int64)
        trained = np.ones(len(ids), dtype=bool) if spans is None else _trained_mask(encoding.offsets, spans)
        encoded[owner].append(None if truncated and not trained.any() else Encoded(ids, trained, truncated))
    return encoded


def _trained_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> np.ndarray:
    """Tokens whose characters overlap a trained span (zero-width tokens: that lie inside one)."""
    bounds = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    starts, ends = bounds[:, 0], bounds[:, 1]
    trained = np.zeros(len(bounds), dtype=bool)
    for lo, hi in spans:
        trained |= (starts < hi) & (ends > lo)
        trained |= (starts == ends) & (starts >= lo) & (starts < hi)
    return trained


def labels_of(ids: np.ndarray, trained: np.ndarray) -> list[int]:
    return np.where(trained, ids, IGNORE).tolist()


def count_encoded(stats: TokenizeStats, origin: str, encoded: Encoded | None) -> None:
    """Record one example's fate (kept, cut or dropped) in the statistics."""
    if encoded is None:
        stats.dropped += 1
        _keep(stats.dropped_origins, origin)
    else:
        stats.rows += 1
        if encoded.truncated:
            stats.truncated += 1
            _keep(stats.truncated_origins, origin)


def count_repairs(stats: TokenizeStats, example: Example) -> None:
    if example.repairs:
        stats.repaired += 1
        _keep(stats.repaired_rows, f"{example.origin}: {'; '.join(example.repairs)}")


def _keep(examples: list[str], item: str) -> None:
    if len(examples) < KEEP:
        examples.append(item)


def tokenize_examples(tokenizer, template: str, examples: list[Example], max_length: int
                      ) -> tuple[list[TokenizedRow], TokenizeStats]:
    """The examples as rows of Python lists (for small sets: evaluation, tests); see `encode_examples`."""
    stats = TokenizeStats()
    rows = []
    for example, parts in zip(examples, encode_examples(tokenizer, template, examples, max_length), strict=True):
        for encoded in parts:
            count_encoded(stats, example.origin, encoded)
            if encoded is not None:
                rows.append(TokenizedRow(encoded.ids.tolist(), labels_of(encoded.ids, encoded.trained),
                                         example.origin))
    return rows, stats
