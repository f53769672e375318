"""Conversations → token ids and labels, with the prompt/completion boundary found exactly.

The whole conversation is rendered once and tokenised once. A trained span is the text an assistant turn adds
to the conversation before it, as that turn renders when the conversation goes on after it: it ends with the
end-of-turn token, and what a template writes only after the very last message (Phi-3's eos) and trailing
whitespace are left out. A token is trained when its characters overlap a trained span, so a BPE token that
merges the last prompt character with the first completion character is trained: the model must predict it to
produce the completion.

A turn's reasoning (see `alignkit.data.formats`) is trained with it, or with `train_reasoning: false` left out
of the loss: the turn's trained text then starts after the reasoning and the `</think>` closing it, so the model
learns the answer that follows reasoning it does not learn to write. Templates that do not render
`reasoning_content` themselves get it as a <think> block before the content.

Truncation policy (`max_length`): a row longer than max_length keeps its first max_length tokens (the completion
is cut from the end); a row with no trained token among them (its prompt alone fills max_length) is dropped.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from alignkit.data.formats import THINK_CLOSE, Example, Message
from alignkit.errors import UserError

IGNORE = -100  # label of tokens that are not trained (torch's cross-entropy ignore_index)
FIRST_CUT = 8  # characters per token where a long text is first cut before encoding (see `encode_cut`)
KEEP = 5  # origins of dropped, truncated, skipped and repaired rows named in the statistics, the first few


@dataclass(frozen=True)
class Rendering:
    """How conversations render and what of a reply is trained: the run's `train_reasoning` and
    `enable_thinking` (passed to templates that take it, such as Qwen3's; None passes nothing)."""

    train_reasoning: bool = True
    enable_thinking: bool | None = None

    @classmethod
    def of(cls, cfg) -> Rendering:
        """The rendering a run's config asks for."""
        return cls(getattr(cfg, "train_reasoning", True), getattr(cfg, "enable_thinking", None))

    def template_kwargs(self) -> dict:
        return {} if self.enable_thinking is None else {"enable_thinking": self.enable_thinking}


PLAIN = Rendering()


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


def render(tokenizer, template: str, messages: list[Message], add_generation_prompt: bool = False,
           tools: list[dict] | None = None, rendering: Rendering = PLAIN) -> str:
    return render_many(tokenizer, template, [messages], add_generation_prompt, [tools], rendering)[0]


def render_many(tokenizer, template: str, conversations: list[list[Message]], add_generation_prompt: bool = False,
                tools: list[list[dict] | None] | None = None, rendering: Rendering = PLAIN) -> list[str]:
    """Several conversations rendered as `apply_chat_template(..., tools=, tokenize=False)` renders each;
    `tools[k]` are conversation k's tool schemas.

    The template is compiled once by transformers' own sandboxed environment and rendered with what
    apply_chat_template passes it (the messages, the tools, no documents, the special tokens, and
    `enable_thinking` when the run sets it): apply_chat_template itself copies and normalises every message on
    every call, which for the many prefix renders of a long conversation costs more than the rendering
    (tests/test_tokenize.py checks both agree on every template)."""
    tools = tools or [None] * len(conversations)
    inline = not renders_reasoning(tokenizer, template)
    batch = [[m.template_dict(inline) for m in messages] for messages in conversations]
    extra = rendering.template_kwargs()
    try:
        return [_render(tokenizer, template, chat, chat_tools, add_generation_prompt, extra)
                for chat, chat_tools in zip(batch, tools, strict=True)]
    except Exception as err:  # jinja raises TemplateError, templates may raise their own exceptions
        raise UserError(f"chat template failed to render: {err}") from None


def _render(tokenizer, template: str, chat: list[dict], tools: list[dict] | None, add_generation_prompt: bool,
            extra: dict) -> str:
    compiled, plain = _compiled(template)
    if compiled is None:
        return tokenizer.apply_chat_template(chat, tools=tools, chat_template=template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt, **extra)
    special = plain(dict(tokenizer.special_tokens_map))
    return compiled.render(messages=chat, tools=tools, documents=None, add_generation_prompt=add_generation_prompt,
                           **special, **extra)


REASONING_PROBE = "reasoning-probe-7f3a"


@functools.lru_cache(maxsize=8)
def renders_reasoning(tokenizer, template: str) -> bool:
    """Whether the template writes an assistant message's `reasoning_content` (Qwen3's does); other templates
    would drop it silently, so they get the reasoning inline (`Message.template_dict`)."""
    chat = [{"role": "user", "content": "x"},
            {"role": "assistant", "content": "y", "reasoning_content": REASONING_PROBE}]
    try:
        return REASONING_PROBE in _render(tokenizer, template, chat, None, False, {})
    except Exception:  # a template that cannot render the probe fails with its own message when rows render
        return False


@functools.lru_cache(maxsize=8)
def _compiled(template: str):
    """(transformers' compiled template, its converter of template data), or (None, None) where this
    transformers has no such helpers."""
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template, _plain_template_data
    except ImportError:
        return None, None
    return _compile_jinja_template(template), _plain_template_data


def trained_spans(tokenizer, template: str, examples: list[Example], fulls: list[str], limits: list[int],
                  rendering: Rendering = PLAIN) -> list[list[tuple[int, int]] | NotAPrefix]:
    """The character spans of each example's trained turns in its rendered conversation `fulls[k]`, only of
    the turns that start before `limits[k]` (the rest lie past max_length), or the NotAPrefix error of an
    example whose template renders a turn differently once later turns follow it.

    A turn's text is the turn as it renders with more conversation after it: its rendering alone, when that is
    where the whole conversation goes on (no extra render), else the common start of its rendering alone and
    with the generation prompt of a next turn (Phi-3 writes eos after the very last message only)."""
    def render_prefixes(turns: list[tuple[int, int]], generation_prompt: bool) -> list[str]:
        return render_many(tokenizer, template, [examples[k].messages[:i] for k, i in turns], generation_prompt,
                           [examples[k].tools for k, _ in turns], rendering)

    turns = [(k, i) for k, example in enumerate(examples) for i, m in enumerate(example.messages) if m.train]
    befores = render_prefixes(turns, True)
    kept = [(k, i, before) for (k, i), before in zip(turns, befores, strict=True) if len(before) <= limits[k]]
    alones = render_prefixes([(k, i + 1) for k, i, _ in kept], False)
    unsure = [n for n, ((k, i, _), alone) in enumerate(zip(kept, alones, strict=True))
              if i == len(examples[k].messages) - 1 or not fulls[k].startswith(alone)]
    followed = dict(zip(unsure, render_prefixes([(kept[n][0], kept[n][1] + 1) for n in unsure], True),
                        strict=True))
    spans: list = [[] for _ in examples]
    for n, ((k, i, before), alone) in enumerate(zip(kept, alones, strict=True)):
        through = alone if n not in followed else _common_turn(tokenizer, alone, followed[n])
        if isinstance(spans[k], NotAPrefix):
            continue
        if not (through.startswith(before) and fulls[k].startswith(through) and len(through) > len(before)):
            spans[k] = _not_a_prefix(examples[k], i, rendering)
            continue
        start, end = len(before), len(through.rstrip())
        reasoning = examples[k].messages[i].reasoning_text()
        if not rendering.train_reasoning and reasoning and reasoning.strip():
            start = _answer_start(through, start, end, reasoning.strip())
        spans[k].append((start, end))
    return spans


def _not_a_prefix(example: Example, turn: int, rendering: Rendering) -> NotAPrefix:
    if rendering.enable_thinking is False and example.messages[turn].reasoning_text():
        return NotAPrefix(f"{example.origin}: an assistant turn has reasoning, but with enable_thinking: false "
                          "the template's prompt for the turn closes an empty <think> block before it")
    return NotAPrefix(f"{example.origin}: the chat template renders a conversation differently from its own "
                      "prefix, so turn boundaries cannot be found (try chat_template: chatml)")


def _answer_start(text: str, start: int, end: int, reasoning: str) -> int:
    """Where a turn's text `text[start:end]` goes on after its reasoning: past the reasoning, the `</think>`
    that closes it and the whitespace after. `start` when the template did not write the reasoning there."""
    at = text.find(reasoning, start, end)
    if at == -1:
        return start
    after = at + len(reasoning)
    close = text.find(THINK_CLOSE, after, end)
    if close != -1 and not text[after:close].strip():
        after = close + len(THINK_CLOSE)
    while after < end and text[after].isspace():
        after += 1
    return after


class NotAPrefix(UserError):
    """A turn renders differently once later turns follow it."""


def split_turns(example: Example) -> list[Example]:
    """One example per trained turn: the conversation through it, only it trained. For templates that render
    earlier turns differently once later turns follow (Qwen3 drops their reasoning from the history): each turn
    is then trained in the context the model has when it writes it."""
    messages = example.messages
    assert messages is not None
    return [Example(example.origin, messages=[replace(m, train=k == i) for k, m in enumerate(messages[:i + 1])],
                    tools=example.tools)
            for i, m in enumerate(messages) if m.train]


def _common_turn(tokenizer, alone: str, followed: str) -> str:
    """The common start of two renderings, cut before a special token they share only in part ("<|endoftext|>"
    and "<|assistant|>" share "<|", which belongs to neither turn)."""
    same = _common_start(alone, followed)
    for token in _added_tokens(tokenizer):
        at = alone.find(token, max(0, same - len(token) + 1), same + len(token))
        if at != -1 and at < same:
            same = at
    return alone[:same]


def _common_start(a: str, b: str) -> int:
    """Length of the longest common prefix, by bisection on startswith (C-speed comparisons)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if b.startswith(a[:mid]):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _added_tokens(tokenizer) -> tuple[str, ...]:
    return _added(tokenizer, len(tokenizer))[0]


@functools.lru_cache(maxsize=8)
def _added(tokenizer, size: int) -> tuple[tuple[str, ...], bool]:
    """(the added tokens' texts, whether any strips the whitespace around it), for a tokenizer of `size` tokens
    (adding a token changes the size, and so the cached answer)."""
    added = tokenizer.added_tokens_decoder.values()
    return (tuple(tokenizer.get_added_vocab()),
            any(getattr(token, "lstrip", False) or getattr(token, "rstrip", False) for token in added))


def check_prompt_lengths(stats: TokenizeStats, max_length: int, on_bad_row: str) -> None:
    """Under on_bad_row: error, a row whose prompt alone fills max_length stops the run before training."""
    if stats.dropped and on_bad_row == "error":
        raise UserError(f"{stats.dropped_origins[0]}: the prompt alone fills max_length={max_length} tokens "
                        f"({stats.dropped} rows like this); raise --max-length or pass --on-bad-row skip")


@dataclass
class Encoded:
    """One example as token arrays: ids, which of them are trained, and whether max_length cut it."""

    ids: np.ndarray  # int64
    trained: np.ndarray  # bool, per token (not yet shifted)
    truncated: bool


def encode_examples(tokenizer, template: str, examples: list[Example], max_length: int, split: bool = True,
                    rendering: Rendering = PLAIN) -> list[list[Encoded | None]]:
    """Each example's rows (one, or with `split` one per trained turn: see `split_turns`), each row its tokens,
    or None when its prompt alone fills max_length (nothing left to train)."""
    if not tokenizer.is_fast:
        raise UserError("alignkit needs a fast (Rust) tokenizer to locate completion tokens exactly")
    chats = [k for k, example in enumerate(examples) if example.messages is not None]
    texts = [example.text + (tokenizer.eos_token or "") if example.text is not None else "" for example in examples]
    fulls = render_many(tokenizer, template, [examples[k].messages for k in chats], False,
                        [examples[k].tools for k in chats], rendering)
    for k, text in zip(chats, fulls, strict=True):
        texts[k] = text
    encodings = encode_cut(tokenizer, texts, max_length)
    covered = [encoding.token_to_chars(len(encoding) - 1)[1] if len(encoding) else 0 for encoding, _ in encodings]
    spans: list = [None] * len(examples)  # None: language modelling, every token is trained
    found_spans = trained_spans(tokenizer, template, [examples[k] for k in chats], [texts[k] for k in chats],
                                [covered[k] for k in chats], rendering)
    for k, found in zip(chats, found_spans, strict=True):
        spans[k] = found
    encoded = []
    for example, (encoding, truncated), found in zip(examples, encodings, spans, strict=True):
        if isinstance(found, NotAPrefix):
            if not split or sum(m.train for m in example.messages) < 2:
                raise found
            encoded.append(_split_rows(encode_examples(tokenizer, template, split_turns(example), max_length,
                                                       split=False, rendering=rendering)))
            continue
        ids = np.asarray(encoding.ids, dtype=np.int64)
        trained = np.ones(len(ids), dtype=bool) if found is None else _trained_mask(encoding.offsets, found)
        encoded.append([None if truncated and not trained.any() else Encoded(ids, trained, truncated)])
    return encoded


def _split_rows(parts: list[list[Encoded | None]]) -> list[Encoded | None]:
    """The rows of a split conversation: a later turn whose context alone fills max_length lies past it, as it
    would in the conversation's own row, so it is left out and the conversation counts as truncated."""
    rows = [row for part in parts for row in part]
    kept = rows[:1] + [row for row in rows[1:] if row is not None]
    if len(kept) < len(rows) and kept[-1] is not None:
        kept[-1].truncated = True
    return kept


def encode_cut(tokenizer, texts: list[str], max_length: int) -> list[tuple[Any, bool]]:
    """Each text's encoding cut to max_length tokens, and whether it was longer.

    Exact, and without encoding the whole of a long text: where the tokenizer splits text into pre-tokens and
    has no normaliser that looks past a character (byte-level BPE: GPT-2, Llama 3, Qwen, SmolLM), the tokens of
    every pre-token but the last one of a prefix are the tokens the whole text has there. So a text is encoded
    up to a cut (FIRST_CUT characters per token of max_length, moved off any special token it would split, and
    widened while too short), and its first max_length tokens are taken when they all lie before the prefix's
    last pre-token. Other tokenizers encode the whole text."""
    backend = plain_backend(tokenizer)
    results: list = [None] * len(texts)
    pending, width = list(range(len(texts))), max_length * FIRST_CUT
    while pending:
        cuts = [_cut(tokenizer, texts[i], width) if _cuttable(tokenizer) else len(texts[i]) for i in pending]
        try:
            encodings = backend.encode_batch([texts[i][:cut] for i, cut in zip(pending, cuts, strict=True)],
                                             add_special_tokens=False)
        except TypeError:  # the tokenizer takes only valid Unicode: JSON may escape an unpaired surrogate
            raise UserError("a text field is not valid Unicode (it holds an unpaired surrogate such as \\ud83d)"
                            ) from None
        still = []
        for i, cut, encoding in zip(pending, cuts, encodings, strict=True):
            if cut >= len(texts[i]) or _settled(encoding, max_length):
                truncated = len(encoding) > max_length
                if truncated:
                    encoding.truncate(max_length)
                results[i] = (encoding, truncated)
            else:
                still.append(i)
        pending, width = still, width * 2
    return results


def plain_backend(tokenizer):
    """The tokenizer's Rust backend without padding or truncation. transformers leaves the padding of its last
    padded call (left, to the batch's longest: generation sets it) on the backend, where a direct encode would
    then put pad tokens into the rows; a copy without it is used instead."""
    backend = tokenizer.backend_tokenizer
    if backend.padding is None and backend.truncation is None:
        return backend
    from tokenizers import Tokenizer

    plain = Tokenizer.from_str(backend.to_str())
    plain.no_padding()
    plain.no_truncation()
    return plain


def _settled(encoding, max_length: int) -> bool:
    """Whether the prefix's first max_length + 1 tokens all lie before its last pre-token."""
    if len(encoding) <= max_length:
        return False
    first, last = encoding.token_to_word(max_length), encoding.token_to_word(len(encoding) - 1)
    return first is not None and last is not None and first < last


def _cuttable(tokenizer) -> bool:
    """Whether a prefix's tokens are the whole text's there (see `encode_cut`): pre-tokens, a normaliser that
    looks at one character at most, and no added token that takes in the whitespace around it."""
    backend = tokenizer.backend_tokenizer
    return (backend.pre_tokenizer is not None and not _added(tokenizer, len(tokenizer))[1]
            and (backend.normalizer is None or type(backend.normalizer).__name__ in ("NFC", "NFKC")))


def _cut(tokenizer, text: str, width: int) -> int:
    """Where to cut `text` near `width`: never inside a special token."""
    cut = min(width, len(text))
    for token in _added_tokens(tokenizer):
        at = text.find(token, max(0, cut - len(token) + 1), cut + len(token) - 1)
        if at != -1 and at < cut:
            cut = at
    return cut


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
        keep_example(stats.dropped_origins, origin)
    else:
        stats.rows += 1
        if encoded.truncated:
            stats.truncated += 1
            keep_example(stats.truncated_origins, origin)


def count_repairs(stats: TokenizeStats, example: Example) -> None:
    if example.repairs:
        stats.repaired += 1
        keep_example(stats.repaired_rows, f"{example.origin}: {'; '.join(example.repairs)}")


def keep_example(examples: list[str], item: str) -> None:
    """Append `item` while fewer than KEEP are kept (statistics name the first few rows of each kind)."""
    if len(examples) < KEEP:
        examples.append(item)


def tokenize_examples(tokenizer, template: str, examples: list[Example], max_length: int,
                      rendering: Rendering = PLAIN) -> tuple[list[TokenizedRow], TokenizeStats]:
    """The examples as rows of Python lists (for small sets: evaluation, tests); see `encode_examples`."""
    stats = TokenizeStats()
    rows = []
    encoded = encode_examples(tokenizer, template, examples, max_length, rendering=rendering)
    for example, parts in zip(examples, encoded, strict=True):
        for encoded in parts:
            count_encoded(stats, example.origin, encoded)
            if encoded is not None:
                rows.append(TokenizedRow(encoded.ids.tolist(), labels_of(encoded.ids, encoded.trained),
                                         example.origin))
    return rows, stats
