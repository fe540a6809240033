"""Prompt templates that turn Alpaca-style records into the source text of a training example.

A record has an ``instruction``, an optional ``input`` (extra context) and an ``output`` (the
response). The template only builds the *source* (everything the model is conditioned on); the
response is appended by the data module, which is also where the loss mask is decided
(QLoRA-style training puts the loss on the response only, METHOD.md §6).
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


def get_template(name_or_template: str | PromptTemplate) -> PromptTemplate:
    """Look up a named template (``"alpaca"``, ``"plain"``); a ``PromptTemplate`` passes through."""
    if isinstance(name_or_template, PromptTemplate):
        return name_or_template
    try:
        return TEMPLATES[name_or_template]
    except (KeyError, TypeError):
        known = ", ".join(repr(name) for name in sorted(TEMPLATES))
        raise ValueError(
            f"unknown prompt template {name_or_template!r}; known templates: {known}"
        ) from None


def format_prompt(record: Mapping[str, Any], template: str | PromptTemplate = "alpaca") -> str:
    """Build the source text (prompt up to and including ``### Response:\\n``) for one record."""
    return get_template(template).format(record["instruction"], record.get("input"))
