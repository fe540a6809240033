"""Shared fixtures: a tiny randomly initialised Llama with a real tokenizer, and tiny data.

Unit tests of the framework's mechanics run on this in-process model (seconds on CPU);
tests that need a *pretrained* model use the embedded one in qblora_pl/assets.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.data.tokenizer_fixture import build_tiny_tokenizer

# The test models are tiny: a second intra-op thread buys nothing, and on an oversubscribed
# machine OpenMP's spin-waiting made whole fits up to ~70x slower. Set once, never toggled.
torch.set_num_threads(1)

TINY_RECORDS = [
    {"instruction": f"Add {a} and {b}.", "input": "", "output": str(a + b)}
    for a in range(8)
    for b in range(8)
] + [
    {"instruction": "Repeat the word.", "input": w, "output": f"{w} {w}"}
    for w in ["cat", "mat", "sits", "tips", "diet", "sleep", "text", "French"]
]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama (hidden 64, intermediate 128) saved with its tokenizer, HF format."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    directory = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_tokenizer(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    config = tiny_llama_config(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def tiny_llama_config(vocab_size: int, bos_token_id: int, eos_token_id: int, **overrides):
    """The fixtures' 2-layer Llama shape (hidden 64, intermediate 128, 4 heads)."""
    from transformers import LlamaConfig

    shape = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
    )
    shape.update(overrides)
    return LlamaConfig(vocab_size=vocab_size, bos_token_id=bos_token_id, eos_token_id=eos_token_id, **shape)


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    """train/val/test JSON splits of simple, learnable instruction records."""
    directory = tmp_path_factory.mktemp("tiny-data")
    records = list(TINY_RECORDS)
    (directory / "train.json").write_text(json.dumps(records[:56]))
    (directory / "val.json").write_text(json.dumps(records[56:64]))
    (directory / "test.json").write_text(json.dumps(records[64:]))
    return directory
