"""A real client: llama.cpp (through llama-cpp-python) runs the GGUF export of a QA-BLoRA model.

Exports at INT4, INT3 and INT2 (g32, and g64 / g128) are all Q4_1 files; each runs in llama.cpp
with logits within tolerance of ours. The real-model test (also marked ``realmodel``) exports
SmolLM2-135M-Instruct (tied embeddings, byte-level BPE tokenizer ``smollm``, chat template).

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
from qblora_pl.export.verify import llama_cpp_logits, open_llama_cpp
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


def _export(model_dir, out: Path, bits: int = 4, group_size: int = 32):
    # A modest update (offsets move by about s * 0.1 / g), so a pretrained model stays sensible.
    module = adapted_module(model_dir, "qablora", bits=bits, group_size=group_size, std=0.1)
    report = export_module(module, out, formats=["gguf"], log=print)
    return module, out / "model.gguf", report


@pytest.fixture(scope="module")
def qablora_export(spm_model_dir, tmp_path_factory):
    return _export(spm_model_dir, tmp_path_factory.mktemp("llama-cpp-export"))


def _our_logits(module, prompts_ids):
    module.model.eval()
    with torch.no_grad():
        return [module.model(input_ids=torch.tensor([ids])).logits[0].float().numpy() for ids in prompts_ids]


TOLERANCE = 0.15  # of the logit standard deviation


def test_llama_cpp_runs_the_qablora_q4_1_export(qablora_export, spm_model_dir):
    _check_against_llama_cpp(*qablora_export, spm_model_dir)


@pytest.mark.parametrize("bits, group_size", [(3, 32), (2, 32), (3, 64), (2, 128)])
def test_llama_cpp_runs_int2_and_int3_q4_1_exports(bits, group_size, spm_model_dir, tmp_path):
    import gguf

    module, gguf_path, report = _export(spm_model_dir, tmp_path / "export", bits, group_size)
    types = report["formats"]["gguf"]["layers"]
    assert all(types[name]["gguf_type"] == "Q4_1" for name in module.adapted_layers())
    assert gguf.GGUFReader(str(gguf_path)).get_field("general.file_type").contents() == gguf.LlamaFileType.MOSTLY_Q4_1
    _check_against_llama_cpp(module, gguf_path, report, spm_model_dir)


def _check_against_llama_cpp(module, gguf_path: Path, report, spm_model_dir) -> None:
    """Same tokens as SentencePiece, logits within TOLERANCE of ours, decisive greedy tokens equal."""
    llama_cpp = import_llama_cpp()
    import sentencepiece as spm

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
    for prompt, ours, theirs in zip(PROMPTS, _our_logits(module, prompts_ids), llama_cpp_logits(gguf_path, prompts_ids, n_ctx=128)):
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


def test_llama_cpp_runs_on_its_plain_cpu_kernels_unless_asked(qablora_export):
    """``open_llama_cpp`` keeps weights out of llama.cpp's AMX / CPU_REPACK buffers by default (its
    AMX matmul segfaulted on our exports in CI on an AMX-INT8 CPU) and leaves the defaults as they were."""
    llama_cpp = import_llama_cpp()

    llm = open_llama_cpp(qablora_export[1], n_ctx=64, verbose=False)
    try:
        assert llm.model_params.use_extra_bufts is False
    finally:
        llm.close()
    assert llama_cpp.llama_model_default_params().use_extra_bufts is True  # restored afterwards


@pytest.mark.parametrize("mistake", ["nibbles_swapped", "qk_not_permuted"])
def test_the_tolerance_catches_a_wrong_file(mistake, qablora_export, spm_model_dir, tmp_path, monkeypatch):
    """Negative controls: the same export with a deliberate layout mistake fails the tolerance."""
    import_llama_cpp()  # skips without llama-cpp-python
    import sentencepiece as spm

    import qblora_pl.export.gguf_tensors as gguf_tensors
    import qblora_pl.export.gguf_writer as gguf_writer

    module = qablora_export[0]
    if mistake == "nibbles_swapped":
        pack = gguf_tensors.pack_q4_1

        def swapped(codes, d, m):
            rows, n = codes.shape
            q = codes.reshape(rows, -1, 32)
            return pack(torch.cat([q[..., 16:], q[..., :16]], dim=-1).reshape(rows, n), d, m)

        monkeypatch.setattr(gguf_tensors, "pack_q4_1", swapped)  # used by its _linear_to_gguf
    else:
        monkeypatch.setattr(gguf_writer, "llama_permute_rows", lambda t, n_head, n_head_kv=None: t)  # used by write_gguf
    export_module(module, tmp_path, formats=["gguf"], verify=False, log=lambda _: None)
    sp = spm.SentencePieceProcessor(model_file=str(Path(spm_model_dir) / "tokenizer.model"))
    prompts_ids = [[sp.bos_id(), *sp.encode(p)] for p in PROMPTS[:2]]
    ours, theirs = _our_logits(module, prompts_ids), llama_cpp_logits(tmp_path / "model.gguf", prompts_ids, n_ctx=128)
    assert max(float(np.abs(t - o).max() / o.std()) for o, t in zip(ours, theirs)) > TOLERANCE


# --------------------------------------------------------------------------------------------
# The real model: SmolLM2-135M-Instruct from its Q4_1 GGUF file
# --------------------------------------------------------------------------------------------

from tests.realmodel.conftest import smollm2_gguf  # noqa: E402,F401 - the fixture

CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
MIXED_TEXTS = ["Numbers: 12345 and 3.14159, or 1,000,000!", "  two  spaces\tand a tab\n\nnew lines",
               "I'm sure you'll see we've done it", "Привет, мир! 你好，世界 🦙🚀", "x = f(a[0]) + 'b' ... ???"]


@pytest.fixture(scope="module")
def smollm2_qablora(smollm2_gguf):  # noqa: F811
    from qblora_pl.adapters import QABLoRA
    from qblora_pl.module import QuantizedCausalLM
    from qblora_pl.quantization import GroupwiseInt

    module = QuantizedCausalLM(str(smollm2_gguf), quantization=GroupwiseInt(bits=4, group_size=32),
                               adapter=QABLoRA(budget_rank=8, dropout=0.0))
    module.configure_model()
    return module


@pytest.mark.realmodel
def test_smollm2_export_at_init_is_the_source_file_tensor_for_tensor(smollm2_qablora, smollm2_gguf, tmp_path):  # noqa: F811
    """Adapters at init (no update): INT4 g32 of the Q4_1 source's weights is the source again -
    every tensor, the Q8_0 token embedding included, byte for byte; tokenizer settings carried."""
    import gguf

    report = export_module(smollm2_qablora, tmp_path, formats=["gguf"], verify=False, log=print)["formats"]["gguf"]
    source, export = gguf.GGUFReader(str(smollm2_gguf)), gguf.GGUFReader(str(tmp_path / "model.gguf"))
    theirs, ours = {t.name: t for t in source.tensors}, {t.name: t for t in export.tensors}
    assert set(ours) == set(theirs) and "output.weight" not in ours  # tied embeddings stay tied
    for name, tensor in theirs.items():
        assert ours[name].tensor_type == tensor.tensor_type, name
        assert np.array_equal(np.asarray(ours[name].data), np.asarray(tensor.data)), f"{name} differs from the source"
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.add_bos_token", "tokenizer.chat_template",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "llama.rope.freq_base"):
        assert export.get_field(key).contents() == source.get_field(key).contents(), key
    assert export.get_field("tokenizer.ggml.tokens").contents() == source.get_field("tokenizer.ggml.tokens").contents()
    assert report["dense_tensors"]["token_embd.weight"]["gguf_type"] == "Q8_0"
    print(f"\nSmolLM2 QA-BLoRA INT4 g32 export: {report['bytes']} bytes (source {smollm2_gguf.stat().st_size})")


@pytest.mark.realmodel
def test_llama_cpp_runs_the_smollm2_qablora_export(smollm2_qablora, smollm2_gguf, tmp_path):  # noqa: F811
    """A QA-BLoRA update on SmolLM2 through llama.cpp: HF's tokens for a chat-templated prompt,
    logits about as close to ours as llama.cpp's own run of the source file is to an exact
    evaluation of the source's weights (its 8-bit activations over 30 layers), decisive greedy
    tokens equal.

    llama.cpp's error grows as the weights move away from the source's: measured on its plain CPU
    kernels (max |dlogit| / std, this prompt), adapters at init 0.178 (= the source's), random
    adapters std 0.02 0.198, std 0.05 0.300; a wrong file is off by far more (std 0.05 with the
    nibbles swapped 5.65, q/k rows not permuted 4.01). The bound, 3x the runtime's own error,
    sits between the two."""
    llama_cpp = import_llama_cpp()
    from tests.export.conftest import randomize_adapters

    from qblora_pl.sources import load_causal_lm, load_tokenizer

    module = randomize_adapters(smollm2_qablora, std=0.05)
    report = export_module(module, tmp_path, formats=["gguf"], verify=False, log=print)["formats"]["gguf"]
    assert report["fallback_layers"] == [] and report["exact_q4_1_layers"] == 210
    tokenizer = load_tokenizer(str(smollm2_gguf))
    text = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text)["input_ids"]

    llm = llama_cpp.Llama(model_path=str(tmp_path / "model.gguf"), n_ctx=128, vocab_only=True, verbose=False)
    try:
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == ids, "llama.cpp tokenizes the chat differently"
        for other in MIXED_TEXTS:  # digits, punctuation runs, non-Latin scripts: what the 'smollm' pre-tokenizer splits
            assert llm.tokenize(other.encode(), add_bos=True, special=True) == tokenizer(other)["input_ids"], other
        assert llm.metadata["tokenizer.chat_template"] == tokenizer.chat_template
        assert llm.metadata["tokenizer.ggml.pre"] == "smollm"
    finally:
        llm.close()

    [ours] = _our_logits(module, [ids])
    [theirs] = llama_cpp_logits(tmp_path / "model.gguf", [ids], n_ctx=128)
    # The runtime's own error on this model: llama.cpp on the source file vs its weights in float32.
    base = load_causal_lm(str(smollm2_gguf), dtype=torch.float32).eval()
    with torch.no_grad():
        exact_source = base(input_ids=torch.tensor([ids])).logits[0].numpy()
    del base
    [llama_source] = llama_cpp_logits(smollm2_gguf, [ids], n_ctx=128)
    runtime_error = float(np.abs(llama_source - exact_source).max() / exact_source.std())
    export_error = float(np.abs(theirs - ours).max() / ours.std())
    print(f"\nSmolLM2 QA-BLoRA: llama.cpp vs ours max |dlogit| / std = {export_error:.4g}; llama.cpp on the source "
          f"vs its exact weights {runtime_error:.4g}; greedy agreement {(ours.argmax(-1) == theirs.argmax(-1)).mean():.3f}")
    assert export_error < 3 * runtime_error, f"{export_error:.4g} vs llama.cpp's own {runtime_error:.4g}"
    top2 = np.sort(ours, axis=-1)[:, -2:]
    decisive = (top2[:, 1] - top2[:, 0]) > 2 * runtime_error * ours.std()
    same = ours.argmax(-1) == theirs.argmax(-1)
    assert same[decisive].all(), "llama.cpp picks another greedy token where ours is decisive"
    assert same.mean() >= 0.9, f"greedy tokens agree at {same.mean():.3f} of the positions"
