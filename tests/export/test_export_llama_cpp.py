"""A real client: llama.cpp (through llama-cpp-python) runs the GGUF export of a QA-BLoRA model.

An integration test (``pytest -m integration``; ``.ci/run`` runs it after the unit tests):
llama-cpp-python builds llama.cpp from source when installed (``pip install -e ".[integration]"``,
~23 min on 2 cores), so it is not in the default test command. Without the package it is
skipped - unless ``QBLORA_REQUIRE_LLAMA_CPP=1`` (set by ``.ci/run``), where that is a failure. The model needs a SentencePiece
``tokenizer.model``: the embedded pretrained model when it is present, else a tiny Llama with a
SentencePiece model trained here.

llama.cpp's CPU kernels multiply Q4_1 weights with activations quantized to 8 bits (and keep an
F16 KV cache), so its logits differ from an exact float32 evaluation of the same weights. On
the tiny model that difference is a few percent of the logits' standard deviation - the same
order as for a Q4_1 file made by llama.cpp's own quantizer - while a wrong file is off by more
than the standard deviation (measured: nibbles swapped 5.6x, q/k rows not permuted 1.7x). The
tolerance (15% of the logit std) sits between the two, and the controls at the end show it
would catch those two mistakes. Greedy tokens must agree wherever our top-2 gap exceeds twice
the tolerance (where no error within tolerance could flip them).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from qblora_pl.export import export_module
from qblora_pl.paths import EMBEDDED_MODEL_DIR
from tests.export.conftest import adapted_module

pytestmark = pytest.mark.integration


def import_llama_cpp():
    if os.environ.get("QBLORA_REQUIRE_LLAMA_CPP") == "1":
        import llama_cpp  # CI: a missing client is a failure, never a silent skip

        return llama_cpp
    return pytest.importorskip("llama_cpp")

PROMPTS = [
    "The cat sat on the mat.",
    "A dog is a kind of animal that",
    "In the beginning was the word, and",
    "Numbers: 12 34 56 and more",
]

_WORDS = (
    "the a cat dog sat ran on under mat house tree big small red green blue and or but word "
    "beginning was is kind of animal that numbers more light dark water fire earth sky"
).split()


def _train_tiny_sentencepiece_llama(directory: Path) -> Path:
    import sentencepiece as spm
    from transformers import LlamaConfig, LlamaForCausalLM

    rng = random.Random(0)
    lines = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 14))) + "." for _ in range(400)]
    lines += [" ".join(str(rng.randint(0, 99)) for _ in range(6)) for _ in range(50)]
    corpus = directory / "corpus.txt"
    corpus.write_text("\n".join(lines))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(directory / "tokenizer"), model_type="bpe", vocab_size=320,
        byte_fallback=True, character_coverage=1.0, split_digits=True, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, add_dummy_prefix=True, normalization_rule_name="identity", num_threads=1, minloglevel=2,
    )
    (directory / "tokenizer.vocab").unlink()
    corpus.unlink()
    sp = spm.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))
    config = LlamaConfig(
        vocab_size=sp.vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
        bos_token_id=1, eos_token_id=2, initializer_range=0.08,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def spm_model_dir(tmp_path_factory) -> Path:
    if (EMBEDDED_MODEL_DIR / "tokenizer.model").is_file() and (EMBEDDED_MODEL_DIR / "model.safetensors").is_file():
        return EMBEDDED_MODEL_DIR
    return _train_tiny_sentencepiece_llama(tmp_path_factory.mktemp("spm-llama"))


@pytest.fixture(scope="module")
def qablora_export(spm_model_dir, tmp_path_factory):
    # A modest update (offsets move by about s * 0.1 / 32), so a pretrained model stays sensible.
    module = adapted_module(spm_model_dir, "qablora", std=0.1)
    out = tmp_path_factory.mktemp("llama-cpp-export")
    report = export_module(module, out, formats=["gguf"], log=print)
    return module, out / "model.gguf", report


def _llama_cpp_logits(llama_cpp, gguf_path: Path, prompts_ids: list[list[int]]) -> list[np.ndarray]:
    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=128, logits_all=True, n_threads=2, verbose=False)
    try:
        out = []
        for ids in prompts_ids:
            llm.reset()
            llm.eval(ids)
            out.append(np.array(llm.scores[: len(ids)], dtype=np.float32, copy=True))
        return out
    finally:
        llm.close()


def _our_logits(module, prompts_ids):
    module.model.eval()
    with torch.no_grad():
        return [module.model(input_ids=torch.tensor([ids])).logits[0].float().numpy() for ids in prompts_ids]


TOLERANCE = 0.15  # of the logit standard deviation


def test_llama_cpp_runs_the_qablora_q4_1_export(qablora_export, spm_model_dir):
    llama_cpp = import_llama_cpp()
    import sentencepiece as spm

    module, gguf_path, report = qablora_export
    assert report["formats"]["gguf"]["fallback_layers"] == []
    second_client = report["formats"]["gguf"]["verification"]  # transformers' GGUF loader
    assert second_client["client"] == "transformers GGUF loader" and second_client["argmax_agreement"] == 1.0
    sp = spm.SentencePieceProcessor(model_file=str(Path(spm_model_dir) / "tokenizer.model"))
    prompts_ids = [[sp.bos_id(), *sp.encode(p)] for p in PROMPTS]

    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=128, vocab_only=True, verbose=False)
    try:
        for prompt, ids in zip(PROMPTS, prompts_ids):
            assert llm.tokenize(prompt.encode(), add_bos=True) == ids, f"llama.cpp tokenizes {prompt!r} differently"
    finally:
        llm.close()

    worst, agree, checked = 0.0, 0, 0
    for prompt, ours, theirs in zip(PROMPTS, _our_logits(module, prompts_ids), _llama_cpp_logits(llama_cpp, gguf_path, prompts_ids)):
        spread = float(ours.std())
        diff = float(np.abs(theirs - ours).max())
        worst = max(worst, diff / spread)
        assert diff < TOLERANCE * spread, f"{prompt!r}: max |logit diff| {diff:.4g} vs llama.cpp (logit std {spread:.4g})"
        top2 = np.sort(ours, axis=-1)[:, -2:]
        decisive = (top2[:, 1] - top2[:, 0]) > 2 * TOLERANCE * spread
        same = ours.argmax(-1) == theirs.argmax(-1)
        assert same[decisive].all(), f"{prompt!r}: llama.cpp picks another greedy token where ours is decisive"
        agree += int(same.sum())
        checked += len(same)
    print(f"\nllama.cpp vs in-memory QA-BLoRA: max |logit diff| / logit std = {worst:.4g}; "
          f"greedy agreement {agree}/{checked} positions")


@pytest.mark.parametrize("mistake", ["nibbles_swapped", "qk_not_permuted"])
def test_the_tolerance_catches_a_wrong_file(mistake, qablora_export, spm_model_dir, tmp_path, monkeypatch):
    """Negative controls: the same export with a deliberate layout mistake fails the tolerance."""
    llama_cpp = import_llama_cpp()
    import sentencepiece as spm

    import qblora_pl.export.gguf_writer as gguf_writer

    module = qablora_export[0]
    if mistake == "nibbles_swapped":
        pack = gguf_writer.pack_q4_1

        def swapped(codes, d, m):
            rows, n = codes.shape
            q = codes.reshape(rows, -1, 32)
            return pack(torch.cat([q[..., 16:], q[..., :16]], dim=-1).reshape(rows, n), d, m)

        monkeypatch.setattr(gguf_writer, "pack_q4_1", swapped)
    else:
        monkeypatch.setattr(gguf_writer, "llama_permute_rows", lambda t, n_head, n_head_kv=None: t)
    export_module(module, tmp_path, formats=["gguf"], verify=False, log=lambda _: None)
    sp = spm.SentencePieceProcessor(model_file=str(Path(spm_model_dir) / "tokenizer.model"))
    prompts_ids = [[sp.bos_id(), *sp.encode(p)] for p in PROMPTS[:2]]
    ours, theirs = _our_logits(module, prompts_ids), _llama_cpp_logits(llama_cpp, tmp_path / "model.gguf", prompts_ids)
    assert max(float(np.abs(t - o).max() / o.std()) for o, t in zip(ours, theirs)) > TOLERANCE
