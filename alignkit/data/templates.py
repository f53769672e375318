"""Chat templates: the tokenizer's own, a built-in (chatml, chatml-eos, gemma, llama3, plain) or a .jinja file.

A model without a template gets its family's own turn format when its vocabulary holds that family's turn
markers as single tokens (Gemma, Llama 3, ChatML), else `chatml-eos`, whose turns end with the eos token: a
trained end-of-turn marker is always one token the model can learn to stop on. `plain` concatenates message
texts and ends each assistant turn with the eos token: for prompt/completion string rows that is exactly
`prompt + completion + eos`.

Conversations are tokenised without the tokenizer's own special tokens, so a template that would not render
the bos token the tokenizer adds to every text gets it in front (see `with_bos`).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from alignkit.errors import UserError

BUILT_IN = ("chatml", "chatml-eos", "gemma", "llama3", "plain")
# A model without a chat template: the first family whose markers are all single tokens of its vocabulary.
FAMILIES = (
    ("gemma", ("<start_of_turn>", "<end_of_turn>")),
    ("llama3", ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
    ("chatml", ("<|im_start|>", "<|im_end|>")),
)
FALLBACK = "chatml-eos"
# Markers that end a turn in the families' templates; generation stops on those a template uses.
END_OF_TURN = ("<end_of_turn>", "<|eot_id|>", "<|im_end|>", "<|end|>", "<|eom_id|>")


@dataclass(frozen=True)
class TemplateChoice:
    source: str  # the jinja source, bos added where needed
    name: str | None  # a built-in's name or a file path; None for the tokenizer's own template
    reason: str  # why, for the start-up log


def built_in(name: str) -> str:
    return resources.files("alignkit").joinpath(f"templates/{name}.jinja").read_text(encoding="utf-8")


def single_token(tokenizer, text: str) -> bool:
    return len(tokenizer.encode(text, add_special_tokens=False)) == 1


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer's own encoding of a text starts with its bos token."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("x")["input_ids"][:1] == [bos]


def with_bos(tokenizer, source: str) -> str:
    """`source`, rendering the bos token first when the tokenizer would add it and the template does not."""
    if not adds_bos(tokenizer):
        return source
    try:
        probe = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], chat_template=source,
                                              tokenize=False)
    except Exception:  # a template that cannot render this probe fails with its own message when rows render
        return source
    return source if probe.startswith(tokenizer.bos_token) else "{{ bos_token }}" + source


def family_template(tokenizer) -> tuple[str, str]:
    """(built-in name, reason) for a tokenizer without a chat template."""
    for name, markers in FAMILIES:
        if all(single_token(tokenizer, m) for m in markers):
            return name, f"the tokenizer has no chat template; its vocabulary has {'/'.join(markers)}"
    if tokenizer.eos_token is None:
        raise UserError("the model's tokenizer has no chat template, no known turn tokens and no eos token; "
                        "give one with chat_template: FILE.jinja")
    return FALLBACK, (f"the tokenizer has no chat template and no known turn tokens; turns end with its eos token "
                      f"{tokenizer.eos_token}")


def choose_template(tokenizer, choice: str | None) -> TemplateChoice:
    """The template to render conversations with, and why it was chosen."""
    if choice is None and tokenizer.chat_template:
        source, name, reason = tokenizer.chat_template, None, "the tokenizer's own"
    elif choice is None:
        name, reason = family_template(tokenizer)
        source = built_in(name)
    elif choice in BUILT_IN:
        source, name, reason = built_in(choice), choice, "chat_template"
    elif Path(choice).is_file():
        source, name, reason = Path(choice).read_text(encoding="utf-8"), choice, "chat_template"
    else:
        raise UserError(f"chat_template: '{choice}' is neither a file nor one of {', '.join(BUILT_IN)}")
    bos_source = with_bos(tokenizer, source)
    if bos_source != source:
        reason += f"; {tokenizer.bos_token} first, as the tokenizer adds it"
    return TemplateChoice(bos_source, name, reason)


def resolve_template(tokenizer, choice: str | None) -> str:
    """The jinja source to render conversations with."""
    return choose_template(tokenizer, choice).source


def end_of_turn_ids(tokenizer) -> list[int]:
    """Ids of the single-token end-of-turn markers the tokenizer's chat template renders."""
    template = tokenizer.chat_template or ""
    return [tokenizer.convert_tokens_to_ids(m) for m in END_OF_TURN if m in template and single_token(tokenizer, m)]
