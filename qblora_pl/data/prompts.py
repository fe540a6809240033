"""Prompt templates that turn Alpaca-style records into the source text of a training example.

(``prompt_template: chat`` is the other choice: the tokenizer's own chat template renders
conversations and Alpaca records alike, see :mod:`qblora_pl.data.tokenization`.)

A record has an ``instruction``, an optional ``input`` (extra context) and an ``output`` (the
response). The template only builds the *source* (everything the model is conditioned on); the
response is appended by the data module, which is also where the loss mask is decided
(QLoRA-style training puts the loss on the response only, docs/method.md §6).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PromptTemplate:
    """A pair of ``str.format`` strings, one for records with a non-empty ``input`` and one without.

    Both strings may use ``{instruction}``; ``with_input`` also uses ``{input}``. Only the
    template is parsed by ``str.format``: braces inside the record's text are copied verbatim.
    """

    with_input: str
    without_input: str

    def format(self, instruction: str, input: str | None = None) -> str:  # noqa: A002 - field name
        """Return the source text for one record; an empty or whitespace-only ``input`` counts as none."""
        if input is not None and input.strip():
            return self.with_input.format(instruction=instruction, input=input)
        return self.without_input.format(instruction=instruction)


ALPACA_TEMPLATE = PromptTemplate(
    # Verbatim from Stanford Alpaca (tatsu-lab/stanford_alpaca, train.py: PROMPT_DICT), the
    # prompt the paper's Alpaca runs and QLoRA's `alpaca` dataset format use.
    with_input=(
        "Below is an instruction that describes a task, paired with an input that provides further "
        "context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    ),
    without_input=(
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:\n"
    ),
)

PLAIN_TEMPLATE = PromptTemplate(
    with_input="### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
    without_input="### Instruction:\n{instruction}\n\n### Response:\n",
)

TEMPLATES: dict[str, PromptTemplate] = {"alpaca": ALPACA_TEMPLATE, "plain": PLAIN_TEMPLATE}

CHAT = "chat"
"""The template name that renders with the tokenizer's own chat template
(``tokenizer.apply_chat_template``) instead of a :class:`PromptTemplate`; see
:func:`qblora_pl.data.tokenization.render_conversation`."""


def _unknown(name: Any) -> ValueError:
    known = ", ".join(repr(n) for n in [*sorted(TEMPLATES), CHAT])
    return ValueError(f"unknown prompt template {name!r}; known templates: {known}")


def get_template(name_or_template: str | PromptTemplate) -> PromptTemplate:
    """Look up a named template (``"alpaca"``, ``"plain"``); a ``PromptTemplate`` passes through.

    ``"chat"`` is not a ``PromptTemplate`` (the tokenizer renders it); use
    :func:`resolve_template` where it is allowed.
    """
    if isinstance(name_or_template, PromptTemplate):
        return name_or_template
    if name_or_template == CHAT:
        raise ValueError("prompt template 'chat' renders with the tokenizer's chat template and has no "
                         f"fixed prompt text; here use one of {', '.join(map(repr, sorted(TEMPLATES)))}")
    try:
        return TEMPLATES[name_or_template]
    except (KeyError, TypeError):
        raise _unknown(name_or_template) from None


def resolve_template(name_or_template: str | PromptTemplate) -> PromptTemplate | str:
    """A :class:`PromptTemplate`, or the string ``"chat"`` for the tokenizer's chat template."""
    if name_or_template == CHAT:
        return CHAT
    return get_template(name_or_template)


def format_prompt(record: Mapping[str, Any], template: str | PromptTemplate = "alpaca") -> str:
    """Build the source text (prompt up to and including ``### Response:\\n``) for one record."""
    return get_template(template).format(record["instruction"], record.get("input"))
