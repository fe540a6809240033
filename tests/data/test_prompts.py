"""Prompt templates: exact Alpaca text, input/no-input choice, unknown names."""

import pytest

from qblora_pl.data.prompts import ALPACA_TEMPLATE, PromptTemplate, format_prompt, get_template


def test_alpaca_with_input_is_the_stanford_prompt():
    record = {"instruction": "Translate.", "input": "Hello", "output": "Bonjour"}
    assert format_prompt(record, "alpaca") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nTranslate.\n\n### Input:\nHello\n\n### Response:\n"
    )


@pytest.mark.parametrize("record", [
    {"instruction": "Name a colour.", "output": "Red"},
    {"instruction": "Name a colour.", "input": "", "output": "Red"},
    {"instruction": "Name a colour.", "input": "  \n", "output": "Red"},
    {"instruction": "Name a colour.", "input": None, "output": "Red"},
])
def test_alpaca_without_input(record):
    assert format_prompt(record) == (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nName a colour.\n\n### Response:\n"
    )


def test_plain_template_and_response_text_not_included():
    with_input = {"instruction": "Add.", "input": "2 and 3", "output": "5"}
    assert format_prompt(with_input, "plain") == "### Instruction:\nAdd.\n\n### Input:\n2 and 3\n\n### Response:\n"
    assert format_prompt({"instruction": "Add.", "output": "5"}, "plain") == "### Instruction:\nAdd.\n\n### Response:\n"


def test_braces_in_record_text_are_kept_verbatim():
    record = {"instruction": "Format {x} as JSON {}", "input": "{input}", "output": "{}"}
    assert "Format {x} as JSON {}" in format_prompt(record, "plain")
    assert "### Input:\n{input}\n" in format_prompt(record, "plain")


def test_get_template_passes_instances_and_lists_known_names_on_error():
    custom = PromptTemplate(with_input="Q: {instruction} ({input})\nA: ", without_input="Q: {instruction}\nA: ")
    assert get_template(custom) is custom
    assert get_template("alpaca") is ALPACA_TEMPLATE
    assert format_prompt({"instruction": "hi", "input": "x"}, custom) == "Q: hi (x)\nA: "
    with pytest.raises(ValueError, match=r"unknown prompt template 'vicuna'.*'alpaca', 'plain'"):
        get_template("vicuna")
