"""A real client: mlx-lm (MLX on the CPU) loads and runs our MLX export of a QA-BLoRA model.

An integration test (``pytest -m integration``; ``.ci/run`` runs it with ``QBLORA_REQUIRE_MLX=1``
after ``pip install -e ".[mlx]"``). Without ``mlx_lm`` it is skipped - unless
``QBLORA_REQUIRE_MLX=1``, where that is a failure.

MLX's affine format is our INT-b form (``w = scale * q + bias`` per group) and the export keeps
float32 scales and biases, so the weights mlx-lm computes with are bit for bit the ones our
native loader computes with; what is left is float32 summation order in two different matmul
kernels (``mx.quantized_matmul`` vs a dequantized torch matmul). The logit tolerance
(:data:`TOLERANCE`, relative to the logits' standard deviation) is far above that and far below
what a wrong layout gives; the negative control at the end exports with the bit order of the
packing reversed and shows the tolerance catches it.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from qblora_pl.adapters import QABLoRA
from qblora_pl.export.hf_dense import write_hf_dense
from qblora_pl.export.mlx_writer import pack_mlx_codes, write_mlx
from qblora_pl.export.native import load_native, write_native
from qblora_pl.export.snapshot import FROZEN_DENSE, QuantizedParts, snapshot_merged_model
from qblora_pl.export.verify import load_hf_dense
from qblora_pl.merging import merged
from qblora_pl.module import QuantizedCausalLM
from qblora_pl.paths import EMBEDDED_MODEL_DIR
from qblora_pl.quantization import GroupwiseInt
from qblora_pl.quantization.groupwise_int import GroupwiseIntQuantizer
from qblora_pl.sources import load_tokenizer
from tests.export.conftest import randomize_adapters
from tests.realmodel.conftest import smollm2_gguf  # noqa: F401 - the SmolLM2 fixture

pytestmark = pytest.mark.integration

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPTS = [
    "The cat sat on the mat.",
    "A dog is a kind of animal that",
    "In the beginning was the word, and",
    "Numbers: 12 34 56 and more",
]
# max |logit diff| / logit std. Measured: at most 7e-6 on the embedded model (INT2-4, g32-128) and
# 1.8e-5 on SmolLM2 (30 layers); the packing's bit order reversed gives 5.9.
TOLERANCE = 1e-4
NEW_TOKENS = 16


def import_mlx_lm():
    if os.environ.get("QBLORA_REQUIRE_MLX") == "1":
        import mlx_lm  # CI: a missing client is a failure, never a silent skip

        return mlx_lm
    return pytest.importorskip("mlx_lm")


def qablora_module(source, bits: int, group_size: int, std: float = 0.1) -> QuantizedCausalLM:
    """configs/qablora.yaml's method (QA-BLoRA, budget rank 8, alpha 16) with non-zero adapters."""
    module = QuantizedCausalLM(
        str(source),
        quantization=GroupwiseInt(bits=bits, group_size=group_size),
        adapter=QABLoRA(budget_rank=8, alpha=16, dropout=0.0),
        target_modules=TARGETS,
    )
    module.configure_model()
    return randomize_adapters(module, std=std)


def export_both(module, tokenizer_source, out, **mlx_kwargs):
    """Native and MLX exports of the same merged snapshot; returns their directories."""
    with merged(module.model):
        snapshot = snapshot_merged_model(module.model)
        write_native(snapshot, out / "native", tokenizer_source)
        info = write_mlx(snapshot, out / "mlx", tokenizer_source, **mlx_kwargs)
    return out / "native", out / "mlx", info


def prompt_ids(tokenizer, prompts=PROMPTS) -> list[list[int]]:
    return [list(tokenizer.encode(p)) for p in prompts]


@torch.no_grad()
def torch_greedy(model, ids: list[int], n: int) -> list[int]:
    """Greedy decoding by full recomputation (no cache, no stopping): the plain argmax chain."""
    tokens = torch.tensor([ids])
    out = []
    for _ in range(n):
        nxt = int(model(input_ids=tokens).logits[0, -1].argmax())
        out.append(nxt)
        tokens = torch.cat([tokens, torch.tensor([[nxt]])], dim=1)
    return out


@torch.no_grad()
def compare(reference_model, mlx_model, prompts_ids) -> tuple[float, list[tuple[list[int], list[int]]]]:
    """Worst max |logit diff| / logit std over the prompts, and (ours, mlx) greedy continuations."""
    worst, greedy = 0.0, []
    for ids in prompts_ids:
        ours = reference_model(input_ids=torch.tensor([ids])).logits[0].float()
        theirs = mlx_model(input_ids=torch.tensor([ids])).logits[0]
        worst = max(worst, float((ours - theirs).abs().max() / ours.std()))
        greedy.append((torch_greedy(reference_model, ids, NEW_TOKENS), mlx_model.greedy_tokens(ids, NEW_TOKENS)))
    return worst, greedy


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_packing_matches_mx_quantize(bits, group_size):
    import_mlx_lm()
    import mlx.core as mx

    rng = np.random.default_rng(bits * 1000 + group_size)
    weight = rng.standard_normal((16, 256)).astype(np.float32)
    packed, scales, biases = mx.quantize(mx.array(weight), group_size=group_size, bits=bits)
    dequantized = np.array(mx.dequantize(packed, scales, biases, group_size=group_size, bits=bits))
    s = np.repeat(np.array(scales), group_size, axis=1)
    b = np.repeat(np.array(biases), group_size, axis=1)
    codes = np.rint((dequantized - b) / s)  # the codes, recovered from values alone (no bit layout)
    assert codes.min() >= 0 and codes.max() < 1 << bits
    ours = pack_mlx_codes(torch.from_numpy(codes.astype(np.uint8)), bits)
    assert np.array_equal(ours.numpy(), np.array(packed)), "our uint32 words differ from mx.quantize's"


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_mx_dequantize_reads_our_weights_bit_for_bit(bits, group_size):
    import_mlx_lm()
    import mlx.core as mx

    g = torch.Generator().manual_seed(bits + group_size)
    codes = torch.randint(0, 1 << bits, (8, 256), generator=g, dtype=torch.uint8)
    scales = (torch.rand(8, 256 // group_size, generator=g) * 0.1).half().float()
    offsets = torch.randn(8, 256 // group_size, generator=g)  # float32, as after a QA-* merge
    ours = GroupwiseIntQuantizer(bits, group_size).dequantize(codes, scales, offsets)
    theirs = mx.dequantize(mx.array(pack_mlx_codes(codes, bits).numpy()), mx.array(scales.numpy()),
                           mx.array(offsets.numpy()), group_size=group_size, bits=bits)
    assert np.array_equal(np.array(theirs), ours.numpy())


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_mlx_lm_runs_the_qablora_export_like_our_loader(bits, group_size, tmp_path):
    import_mlx_lm()
    from qblora_pl.export.mlx_loader import load_mlx

    module = qablora_module(EMBEDDED_MODEL_DIR, bits, group_size)
    native_dir, mlx_dir, info = export_both(module, EMBEDDED_MODEL_DIR, tmp_path)
    assert info["int_layers"] == 28 and info["dense_layers"] == 1  # the untied lm_head stays dense
    native, client = load_native(native_dir), load_mlx(mlx_dir)
    ids = prompt_ids(client.tokenizer)
    assert ids == prompt_ids(load_tokenizer(str(EMBEDDED_MODEL_DIR)))  # mlx-lm reads the copied tokenizer alike
    worst, greedy = compare(native, client, ids)
    print(f"\nINT{bits} g{group_size}: {info['bits_per_quantized_weight']:.3f} bits/weight, "
          f"max |logit diff| / std = {worst:.3g} (mlx-lm vs load_native)")
    assert worst < TOLERANCE
    for prompt, (ours, theirs) in zip(PROMPTS, greedy):
        assert ours == theirs, f"{prompt!r}: greedy tokens differ (ours {ours}, mlx-lm {theirs})"

    # The merge is not trivial: the same base with zero adapters gives other logits.
    base = qablora_module(EMBEDDED_MODEL_DIR, bits, group_size, std=0.0).model.eval()
    with torch.no_grad():
        x = torch.tensor([ids[0]])
        ours = native(input_ids=x).logits
        assert float((ours - base(input_ids=x).logits).abs().max() / ours.std()) > 100 * TOLERANCE


def test_layers_of_mixed_widths_and_dense_layers(tmp_path):
    """Per-layer overrides: one layer INT8 g128, one INT3 g64, one dense, the rest INT4 g32."""
    import_mlx_lm()
    from qblora_pl.export.mlx_loader import load_mlx

    module = qablora_module(EMBEDDED_MODEL_DIR, 4, 32)
    with merged(module.model):
        snapshot = snapshot_merged_model(module.model)
    for name, bits, group_size in (("model.layers.1.mlp.down_proj", 8, 128), ("model.layers.2.self_attn.v_proj", 3, 64)):
        linear = snapshot.linears[name]
        codes, scales, offsets = GroupwiseIntQuantizer(bits, group_size).quantize(linear.dense_weight())
        linear.quantized = QuantizedParts(codes, scales, offsets, bits, group_size)
    dense = snapshot.linears["model.layers.3.self_attn.o_proj"]
    dense.weight, dense.quantized, dense.origin = dense.dense_weight(), None, FROZEN_DENSE
    info = write_mlx(snapshot, tmp_path / "mlx", EMBEDDED_MODEL_DIR)
    write_hf_dense(snapshot, tmp_path / "hf", EMBEDDED_MODEL_DIR, torch.float32)  # the float32 reference
    assert set(info["quantization"]) == {"group_size", "bits", "mode", "model.layers.1.mlp.down_proj",
                                         "model.layers.2.self_attn.v_proj"}
    client = load_mlx(tmp_path / "mlx")
    import mlx.nn as mlx_nn

    layers = client.mlx_model.model.layers
    assert (layers[1].mlp.down_proj.bits, layers[1].mlp.down_proj.group_size) == (8, 128)
    assert (layers[2].self_attn.v_proj.bits, layers[2].self_attn.v_proj.group_size) == (3, 64)
    assert type(layers[3].self_attn.o_proj) is mlx_nn.Linear
    worst, greedy = compare(load_hf_dense(tmp_path / "hf"), client, prompt_ids(client.tokenizer))
    assert worst < TOLERANCE
    assert all(ours == theirs for ours, theirs in greedy)


def test_the_tolerance_catches_a_wrong_bit_order(tmp_path, monkeypatch):
    """Negative control: codes packed most-significant bit first load fine but compute garbage."""
    import_mlx_lm()
    import qblora_pl.export.mlx_writer as mlx_writer
    from qblora_pl.export.mlx_loader import load_mlx

    def msb_first(codes, bits):
        flipped = torch.zeros_like(codes)
        for bit in range(bits):
            flipped |= ((codes >> bit) & 1) << (bits - 1 - bit)
        return pack_mlx_codes(flipped, bits)

    monkeypatch.setattr(mlx_writer, "pack_mlx_codes", msb_first)
    module = qablora_module(EMBEDDED_MODEL_DIR, 4, 32)
    native_dir, mlx_dir, _ = export_both(module, EMBEDDED_MODEL_DIR, tmp_path)
    client = load_mlx(mlx_dir)
    worst, _ = compare(load_native(native_dir), client, prompt_ids(client.tokenizer)[:1])
    print(f"\nbit order reversed: max |logit diff| / std = {worst:.3g}")
    assert worst > 100 * TOLERANCE


@pytest.mark.realmodel
def test_mlx_lm_answers_a_chat_prompt_like_our_loader_on_smollm2(smollm2_gguf, tmp_path):  # noqa: F811
    """SmolLM2-135M-Instruct, QA-BLoRA INT4 g32: mlx-lm and load_native agree on a chat prompt."""
    import_mlx_lm()
    from qblora_pl.export.mlx_loader import load_mlx
    from qblora_pl.sources import pretrained_name_or_path

    source = pretrained_name_or_path(str(smollm2_gguf))
    module = qablora_module(smollm2_gguf, 4, 32, std=0.02)
    native_dir, mlx_dir, info = export_both(module, source, tmp_path)
    assert info["dense_layers"] == 0 and info["int_layers"] == 30 * 7  # tied head: read from embed_tokens
    native, client = load_native(native_dir), load_mlx(mlx_dir)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = list(client.tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    ours_ids = load_tokenizer(str(smollm2_gguf)).apply_chat_template(messages, add_generation_prompt=True,
                                                                     return_dict=False)
    assert ids == list(ours_ids), "mlx-lm renders the chat prompt differently"
    worst, [(ours, theirs)] = compare(native, client, [ids])
    answer = client.tokenizer.decode(theirs)
    print(f"\nSmolLM2 QA-BLoRA INT4 g32: {info['bytes'] / 2**20:.1f} MiB, max |logit diff| / std = {worst:.3g}; "
          f"mlx-lm answers {answer!r}")
    assert worst < TOLERANCE
    assert ours == theirs, f"greedy tokens differ: ours {ours}, mlx-lm {theirs}"
    assert "Paris" in answer
