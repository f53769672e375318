"""Binary feedback rows for KTO: (prompt, completion, label) → one tokenised sequence and its label.

Row shape: `prompt` and `completion` as strings (a user prompt, an assistant reply) or as message lists (the
prompt may be a conversation with a system message; the completion holds assistant messages), and `label`, a
JSON boolean: true for a desirable completion (thumbs up), false for an undesirable one. A row-level `tools`
list is given to the template. The sequence is tokenised like one side of a DPO pair: the completion's tokens,
end-of-turn token included, are the ones scored. Stores of these rows keep each row's label beside its tokens
(`alignkit.data.store`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from alignkit.data.formats import Message, row_tools
from alignkit.data.prefs import _side
from alignkit.data.sources import Row
from alignkit.data.tokenize import IGNORE, TokenizedRow
from alignkit.errors import UserError


@dataclass
class FeedbackExample:
    origin: str
    prompt: list[Message]
    completion: list[Message]
    label: bool
    tools: list[dict] | None = None


@dataclass
class FeedbackRow:
    sequence: TokenizedRow
    label: bool  # True: desirable
    origin: str
    position: int = -1  # index in the rows it was read from

    # read like a one-sequence row by code that lists or counts rows of any kind (store.lengths, inspection)
    @property
    def input_ids(self) -> list[int]:
        return self.sequence.input_ids

    @property
    def labels(self) -> list[int]:
        return self.sequence.labels


@dataclass
class FeedbackStats:
    rows: int = 0
    desirable: int = 0
    undesirable: int = 0
    truncated: int = 0
    dropped: int = 0
    dropped_origins: list[str] = field(default_factory=list)  # the first few
    skipped: int = 0
    skipped_rows: list[str] = field(default_factory=list)


def to_feedback(row: Row) -> FeedbackExample:
    prompt, completion = _side(row, "prompt"), _side(row, "completion")
    if "label" not in row.fields or row.fields["label"] is None:
        raise UserError(f"{row.origin}: missing field 'label'")
    label = row.fields["label"]
    if not isinstance(label, bool):
        raise UserError(f"{row.origin}: field 'label' must be true or false, got {label!r}")
    if all(m.is_empty() for m in prompt):
        raise UserError(f"{row.origin}: field 'prompt' is empty")
    if all(m.is_empty() for m in completion):
        raise UserError(f"{row.origin}: field 'completion' is empty")
    if any(m.role != "assistant" for m in completion):
        raise UserError(f"{row.origin}: field 'completion' may hold assistant messages only")
    return FeedbackExample(row.origin, prompt, completion, label, row_tools(row))


def mismatched(row: TokenizedRow, other: TokenizedRow, max_length: int) -> TokenizedRow:
    """`row`'s prompt followed by `other`'s completion (from its first scored token), cut to max_length."""
    start = prompt_length(row)
    other_start = prompt_length(other)
    ids = (row.input_ids[:start] + other.input_ids[other_start:])[:max_length]
    labels = ([IGNORE] * start + other.labels[other_start:])[:max_length]
    return TokenizedRow(ids, labels, row.origin)


def prompt_length(row: TokenizedRow) -> int:
    return next((i for i, label in enumerate(row.labels) if label != IGNORE), len(row.labels))
