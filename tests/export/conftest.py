"""Fixtures for the export tests: adapted modules with non-zero adapters on tiny Llamas."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from qblora_pl.adapters import LoRA, QABLoRA
from qblora_pl.module import QuantizedCausalLM
from qblora_pl.quantization import NF4, GroupwiseInt
from tests.conftest import tiny_llama_config


def randomize_adapters(module: QuantizedCausalLM, std: float = 0.3, seed: int = 1) -> QuantizedCausalLM:
    """Non-zero adapters: a zero update would let an export test pass without merging anything."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(module.named_parameters()):
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    return module


def adapted_module(
    model_dir, method: str = "qablora", bits: int = 4, group_size: int = 32, std: float = 0.3
) -> QuantizedCausalLM:
    if method == "qablora":
        quantization, adapter = GroupwiseInt(bits=bits, group_size=group_size), QABLoRA(budget_rank=4, dropout=0.0)
    elif method == "qlora":
        quantization, adapter = NF4(), LoRA(r=4, dropout=0.0)
    else:
        raise ValueError(method)
    module = QuantizedCausalLM(str(model_dir), quantization=quantization, adapter=adapter)
    module.configure_model()
    return randomize_adapters(module, std=std)


@pytest.fixture(scope="session")
def gqa_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny fixture's tokenizer with a grouped-query Llama (4 query heads, 2 key/value heads),
    so the GGUF q/k row permutation is exercised with n_head != n_head_kv."""
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = tmp_path_factory.mktemp("tiny-llama-gqa")
    for path in Path(tiny_model_dir).iterdir():
        if path.name.startswith("tokenizer") or path.name == "special_tokens_map.json":
            shutil.copy2(path, directory / path.name)
    base = LlamaConfig.from_pretrained(tiny_model_dir)
    config = tiny_llama_config(
        base.vocab_size, base.bos_token_id, base.eos_token_id, num_key_value_heads=2, max_position_embeddings=256
    )
    torch.manual_seed(3)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def qablora_module(tiny_model_dir) -> QuantizedCausalLM:
    return adapted_module(tiny_model_dir, "qablora")


@pytest.fixture(scope="module")
def qablora_gqa_module(gqa_model_dir) -> QuantizedCausalLM:
    return adapted_module(gqa_model_dir, "qablora")


@pytest.fixture(scope="session")
def wide_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny fixture's tokenizer on a Llama whose widths (128, 256) divide into groups of 128."""
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = tmp_path_factory.mktemp("tiny-llama-128")
    for path in Path(tiny_model_dir).iterdir():
        if path.name.startswith("tokenizer") or path.name == "special_tokens_map.json":
            shutil.copy2(path, directory / path.name)
    base = LlamaConfig.from_pretrained(tiny_model_dir)
    config = tiny_llama_config(base.vocab_size, base.bos_token_id, base.eos_token_id, hidden_size=128,
                               intermediate_size=256, num_key_value_heads=2, tie_word_embeddings=True,
                               rope_parameters={"rope_type": "default", "rope_theta": 50000.0})
    torch.manual_seed(5)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory
