"""prompt_template: chat - conversations and Alpaca records through the tokenizer's chat template.

The loss must fall on the assistant replies only (content + ``<|im_end|>``), in every turn.
Tested on a tiny ChatML tokenizer built in-process; one ``realmodel`` test repeats the key
check on SmolLM2's own tokenizer and template (read from its GGUF file).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qblora_pl.data.datamodule import InstructionDataModule
from qblora_pl.data.tokenization import IGNORE_INDEX, tokenize_records
from qblora_pl.data.tokenization import render_conversation

try:  # importable both as a package module and from pytest's rootdir-less sys.path insertion
    from tests.data.tokenizer_fixture import build_tiny_chat_tokenizer, build_tiny_tokenizer
except ImportError:  # pragma: no cover
    from tokenizer_fixture import build_tiny_chat_tokenizer, build_tiny_tokenizer

from tests.realmodel.conftest import smollm2_gguf  # noqa: E402,F401 - the fixture (QBLORA_REQUIRE_REAL=1: absent fails)

SYSTEM = {"role": "system", "content": "You answer briefly."}
TURNS = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "Translate the sentence into French: the cat sits on the mat."},
    {"role": "assistant", "content": "Le chat est assis sur le tapis."},
]


@pytest.fixture(scope="module")
def chat_tokenizer_dir(tmp_path_factory):
    return str(build_tiny_chat_tokenizer(tmp_path_factory.mktemp("tiny_chat_tokenizer")))


@pytest.fixture(scope="module")
def chat_tokenizer(chat_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(chat_tokenizer_dir)


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def chat_records(n: int) -> list[dict]:
    """n two-turn conversations with a system prompt, alternating messages / ShareGPT kinds."""
    records = []
    for i in range(n):
        messages = [SYSTEM, *TURNS[:2], TURNS[2], {"role": "assistant", "content": f"Reply {i}. " + "the answer " * i}]
        if i % 2:
            names = {"system": "system", "user": "human", "assistant": "gpt"}
            records.append({"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in messages]})
        else:
            records.append({"messages": messages})
    return records


def trained_runs(tokenizer, example) -> list[str]:
    """Decoded runs of consecutive labelled tokens (each should be one assistant reply)."""
    labels = example["labels"].tolist()
    runs, current = [], []
    for label in labels + [IGNORE_INDEX]:
        if label != IGNORE_INDEX:
            current.append(label)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs


def tokenize(tokenizer, records, **kwargs):
    kwargs = {"max_source_length": 384, "max_target_length": 128, **kwargs}
    return tokenize_records(records, tokenizer, "chat", kwargs.pop("max_source_length"),
                            kwargs.pop("max_target_length"), **kwargs)


# -- assistant-only labels ------------------------------------------------------------------------


def test_single_turn_labels_only_the_reply_and_its_end_of_turn(chat_tokenizer):
    record = {"messages": TURNS[:2]}
    example = tokenize(chat_tokenizer, [record])[0]
    ids = example["input_ids"].tolist()
    assert chat_tokenizer.decode(ids) == chat_tokenizer.apply_chat_template(TURNS[:2], tokenize=False)
    assert trained_runs(chat_tokenizer, example) == ["The capital of France is Paris.<|im_end|>"]
    # The header "<|im_start|>assistant\n" and the newline after <|im_end|> stay untrained.
    first = next(i for i, label in enumerate(example["labels"].tolist()) if label != IGNORE_INDEX)
    assert chat_tokenizer.decode(ids[:first]).endswith("<|im_start|>assistant\n")
    assert chat_tokenizer.decode(ids[-1:]) == "\n" and example["labels"][-1] == IGNORE_INDEX


def test_multi_turn_labels_every_assistant_turn_and_nothing_else(chat_tokenizer):
    messages = [SYSTEM, *TURNS]
    dataset = tokenize(chat_tokenizer, [{"messages": messages}])
    example = dataset[0]
    assert trained_runs(chat_tokenizer, example) == [
        "The capital of France is Paris.<|im_end|>", "Le chat est assis sur le tapis.<|im_end|>"]
    untrained = [i for i, label in enumerate(example["labels"].tolist()) if label == IGNORE_INDEX]
    text = chat_tokenizer.decode([example["input_ids"][i] for i in untrained])
    for message in (SYSTEM, TURNS[0], TURNS[2]):
        assert message["content"] in text
    stats = dataset.stats()
    assert stats["supervised_tokens"] == int((example["labels"] != IGNORE_INDEX).sum())
    assert stats["truncated"] == stats["dropped_too_long"] == 0


def test_sharegpt_record_tokenizes_like_the_same_messages(chat_tokenizer_dir, tmp_path):
    messages = [SYSTEM, *TURNS]
    sharegpt = {"conversations": [
        {"from": "system", "value": SYSTEM["content"]},
        {"from": "human", "value": TURNS[0]["content"]},
        {"from": "gpt", "value": TURNS[1]["content"]},
        {"from": "user", "value": TURNS[2]["content"]},  # OpenAI names are accepted in "from" too
        {"from": "assistant", "value": TURNS[3]["content"]},
    ]}
    for name in ("train", "val", "test"):
        write_jsonl(tmp_path / f"{name}.jsonl", [sharegpt, {"messages": messages}])
    dm = InstructionDataModule(str(tmp_path), tokenizer_name_or_path=chat_tokenizer_dir, prompt_template="chat")
    dm.setup("fit")
    assert dm.records("train") == [{"messages": messages}, {"messages": messages}]
    a, b = dm._datasets["train"][0], dm._datasets["train"][1]
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    assert len(trained_runs(dm.tokenizer, a)) == 2


def test_alpaca_record_under_chat_is_one_user_assistant_exchange(chat_tokenizer):
    with_input = {"instruction": "Translate the sentence into French.", "input": "The cat sits on the mat.",
                  "output": "Le chat est assis sur le tapis."}
    without_input = {"instruction": "What is the capital of France?", "input": "  ", "output": "Paris."}
    dataset = tokenize(chat_tokenizer, [with_input, without_input])
    assert chat_tokenizer.decode(dataset[0]["input_ids"]) == (
        "<|im_start|>user\nTranslate the sentence into French.\n\nThe cat sits on the mat.<|im_end|>\n"
        "<|im_start|>assistant\nLe chat est assis sur le tapis.<|im_end|>\n")
    assert chat_tokenizer.decode(dataset[1]["input_ids"]).startswith(
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>")
    assert trained_runs(chat_tokenizer, dataset[0]) == ["Le chat est assis sur le tapis.<|im_end|>"]
    assert trained_runs(chat_tokenizer, dataset[1]) == ["Paris.<|im_end|>"]


def test_train_on_source_trains_every_token_of_the_conversation(chat_tokenizer):
    example = tokenize(chat_tokenizer, [{"messages": [SYSTEM, *TURNS]}], train_on_source=True)[0]
    assert torch.equal(example["labels"], example["input_ids"])


def test_mixed_record_kinds_in_one_file_under_chat(chat_tokenizer_dir, tmp_path):
    records = chat_records(6) + [{"instruction": f"Task {i}: describe the task", "output": f"Answer {i}."}
                                 for i in range(6)]
    data = write_jsonl(tmp_path / "mixed.jsonl", records)
    dm = InstructionDataModule(str(data), tokenizer_name_or_path=chat_tokenizer_dir, prompt_template="chat",
                               val_fraction=0.2, test_fraction=0.2, batch_size=2)
    dm.setup("fit")
    kinds = {"messages" in r for s in ("train", "val", "test") for r in dm.records(s)}
    assert kinds == {True, False}
    for batch in dm.train_dataloader():
        assert (batch["labels"] != IGNORE_INDEX).any(dim=1).all()  # every example trains on something
    for record, batch in zip(dm.records("test"), dm.predict_dataloader()):
        reply = record["messages"][2]["content"] if "messages" in record else record["output"]
        response = batch["input_ids"][0][batch["labels"][0] != IGNORE_INDEX]
        assert dm.tokenizer.decode(response).startswith(reply + "<|im_end|>")


# -- errors ---------------------------------------------------------------------------------------


def test_chat_records_with_alpaca_template_say_to_use_chat(chat_tokenizer_dir, tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", [{"instruction": "a", "output": "b"}] * 3 + chat_records(1))
    dm = InstructionDataModule(str(data), tokenizer_name_or_path=chat_tokenizer_dir, val_fraction=0, test_fraction=0)
    with pytest.raises(ValueError, match=r"chat\.jsonl: row 3 \(0-based\): is a conversation .*prompt_template: chat"):
        dm.setup("fit")


def test_tokenizer_without_chat_template_is_refused(tmp_path):
    tokenizer_dir = str(build_tiny_tokenizer(tmp_path / "plain_tokenizer"))
    data = write_jsonl(tmp_path / "chat.jsonl", chat_records(4))
    dm = InstructionDataModule(str(data), tokenizer_name_or_path=tokenizer_dir, prompt_template="chat")
    with pytest.raises(ValueError, match=r"tokenizer '.*plain_tokenizer' has none \(tokenizer\.chat_template is "
                                         r"None\) \(data: .*chat\.jsonl\)"):
        dm.setup("fit")


@pytest.mark.parametrize("record, message", [
    ({"messages": [{"role": "user", "content": "hi"}]}, r"conversation has no assistant turn \(roles: user\)"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}]},
     r"messages\[1\]: unknown role 'tool' in field 'role'; expected one of assistant, system, user"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "x"}]},
     r"conversations\[1\]: unknown role 'bot' in field 'from'; expected one of assistant, gpt, human, system, user"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]},
     r"messages\[1\]: field 'content' is empty"),
    ({"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}]},
     r"messages\[0\]: field 'content' is empty"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": None}]},
     r"conversations\[1\]: required field 'value' is missing or null"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ["x"]}]},
     r"messages\[1\]: field 'content' must be a string, got list"),
    ({"messages": []}, r"field 'messages' must be a non-empty list .* got an empty list"),
    ({"messages": "hi"}, r"field 'messages' must be a non-empty list .* got str"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, r"starts with an assistant turn"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "instruction": "z"},
     r"has fields 'messages', 'instruction'; a record is either"),
])
def test_bad_conversation_error_names_file_and_row(tmp_path, record, message):
    data = write_jsonl(tmp_path / "chat.jsonl", chat_records(5) + [record] + chat_records(2))
    with pytest.raises(ValueError, match=rf"chat\.jsonl: row 5 \(0-based\)(: |.*){message}"):
        InstructionDataModule(str(data), prompt_template="chat").records("train")


def test_template_that_is_not_prefix_stable_is_refused(tmp_path):
    # Marks the last message: rendering a prefix then is not a prefix of the whole conversation.
    unstable = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                "{% if loop.last %} (last){% endif %}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tokenizer_dir = str(build_tiny_chat_tokenizer(tmp_path / "unstable", chat_template=unstable))
    data = write_jsonl(tmp_path / "chat.jsonl", chat_records(4))
    dm = InstructionDataModule(str(data), tokenizer_name_or_path=tokenizer_dir, prompt_template="chat",
                               val_fraction=0, test_fraction=0)
    with pytest.raises(ValueError, match=r"chat\.jsonl: row 0 \(0-based\): the tokenizer's chat template is not "
                                         r"prefix-stable: rendering messages\[:2\] .*messages\[2\] cannot be "
                                         r"located.*train_on_source"):
        dm.setup("fit")
    # Training on every token needs no reply positions, so it still works with such a template.
    dm = InstructionDataModule(str(data), tokenizer_name_or_path=tokenizer_dir, prompt_template="chat",
                               val_fraction=0, test_fraction=0, train_on_source=True)
    dm.setup("fit")
    assert len(dm._datasets["train"]) == 4


def test_render_conversation_spans_are_the_replies(chat_tokenizer):
    text, spans = render_conversation([SYSTEM, *TURNS], chat_tokenizer)
    assert [text[a:b] for a, b in spans] == [TURNS[1]["content"] + "<|im_end|>", TURNS[3]["content"] + "<|im_end|>"]


# -- truncation -----------------------------------------------------------------------------------


def test_truncation_is_counted_and_replyless_examples_are_dropped(chat_tokenizer_dir, tmp_path, monkeypatch):
    long_prompt = {"messages": [{"role": "user", "content": "describe the task " * 40},
                                {"role": "assistant", "content": "Short."}]}
    long_reply = {"messages": [{"role": "user", "content": "Hi"},
                               {"role": "assistant", "content": "the response " * 40}]}
    short = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    trailing_user = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                                  {"role": "user", "content": "describe the task " * 40}]}
    records = [short, long_prompt, long_reply, short, trailing_user]
    for name in ("train", "val", "test"):
        write_jsonl(tmp_path / f"{name}.jsonl", records)
    dm = InstructionDataModule(str(tmp_path), tokenizer_name_or_path=chat_tokenizer_dir, prompt_template="chat",
                               max_source_length=24, max_target_length=16)
    logged: list[str] = []  # Lightning's loggers may not propagate to caplog once a Trainer has run
    monkeypatch.setattr("qblora_pl.data.datamodule.rank_zero_info", logged.append)
    dm.setup("fit")
    dataset = dm._datasets["train"]
    assert max(dataset.lengths) == 40
    stats = dm.split_stats()["train"]
    assert stats["examples"] == 4 and stats["dropped_too_long"] == 1  # long_prompt: no reply token left
    assert stats["truncated"] == 3 and stats["target_truncated"] == 2 and stats["source_truncated"] == 1
    assert dm.records("train") == [short, long_reply, short, trailing_user]  # aligned with the examples
    reply = dataset[1]["labels"][dataset[1]["labels"] != IGNORE_INDEX]
    text = dm.tokenizer.decode(reply)
    assert text.startswith("the response") and not text.endswith("<|im_end|>")  # cut: no end of turn
    log_text = "\n".join(logged)
    assert "data: train: 3 of 5 records truncated (cut to 40 tokens" in log_text
    assert "dropped with no reply token left: 1" in log_text


def test_eos_that_is_not_the_end_of_turn_token_warns(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(build_tiny_chat_tokenizer(tmp_path / "tok")))
    tokenizer.eos_token = "</s>"
    with pytest.warns(UserWarning, match=r"do not contain the tokenizer's eos token '</s>'.*'<\|im_end\|>'"):
        tokenize(tokenizer, [{"messages": TURNS[:2]}])


# -- the real template --------------------------------------------------------------------------


@pytest.mark.realmodel
def test_smollm2_template_labels_only_the_assistant_replies(smollm2_gguf):  # noqa: F811
    from qblora_pl.sources import load_tokenizer

    tokenizer = load_tokenizer(smollm2_gguf)
    assert tokenizer.chat_template is not None and tokenizer.eos_token == "<|im_end|>"
    for messages in (TURNS, [SYSTEM, *TURNS]):  # with and without the template's default system prompt
        example = tokenize(tokenizer, [{"messages": messages}])[0]
        assert tokenizer.decode(example["input_ids"]) == tokenizer.apply_chat_template(messages, tokenize=False)
        assert trained_runs(tokenizer, example) == [TURNS[1]["content"] + "<|im_end|>",
                                                    TURNS[3]["content"] + "<|im_end|>"]
    alpaca = tokenize(tokenizer, [{"instruction": "Name a colour.", "input": "", "output": "Blue."}])[0]
    assert trained_runs(tokenizer, alpaca) == ["Blue.<|im_end|>"]
