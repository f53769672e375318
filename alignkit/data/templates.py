"""Chat templates: the tokenizer's own, a built-in (chatml, llama3, plain) or a .jinja file.

A model without a template gets `chatml`. `plain` concatenates message texts and ends each assistant turn with
the eos token: for prompt/completion string rows that is exactly `prompt + completion + eos`.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from alignkit.errors import UserError

BUILT_IN = ("chatml", "llama3", "plain")
DEFAULT = "chatml"


def built_in(name: str) -> str:
    return resources.files("alignkit").joinpath(f"templates/{name}.jinja").read_text(encoding="utf-8")


def resolve_template(tokenizer, choice: str | None) -> str:
    """The jinja source to render conversations with."""
    if choice is None:
        return tokenizer.chat_template or built_in(DEFAULT)
    if choice in BUILT_IN:
        return built_in(choice)
    path = Path(choice)
    if path.is_file():
        return path.read_text(encoding="utf-8")
    raise UserError(f"chat_template: '{choice}' is neither a file nor one of {', '.join(BUILT_IN)}")
