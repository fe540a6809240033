"""A real client: mlx-lm (MLX on the CPU) loads and runs our MLX export of a QA-BLoRA model.

An integration test (``pytest -m integration``; ``.ci/run`` runs it with ``QBLORA_REQUIRE_MLX=1``
after ``pip install -e ".[mlx]"``). Without ``mlx_lm`` it is skipped - unless
``QBLORA_REQUIRE_MLX=1``, where that is a failure.

MLX's affine format is our INT-b form (``w = scale * q + bias`` per group) and the export keeps
float32 scales and biases, so mlx-lm computes with our weights bit for bit. Two checks follow
from that:

* within MLX: the quantized export against a dense float32 MLX export of the same merged weights
  (written by the same writer, every layer dense) - measured identical (0), asserted to
  :data:`SAME_RUNTIME_TOLERANCE`;
* across runtimes: mlx-lm against our own loader (``load_native``, torch). The weights are the
  same; MLX's and torch's float32 kernels (attention, RoPE, norms, summation order) are not.
  :data:`CROSS_RUNTIME_TOLERANCE` sits above what that gives and below what 16-bit scales and
  biases or a wrong layout give; greedy tokens must agree. The negative control at the end
  exports with the packing's bit order reversed and shows the tolerance catches it.

All differences are max |logit difference| divided by the logits' standard deviation.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from qblora_pl.adapters import QABLoRA
from qblora_pl.export.hf_dense import write_hf_dense
from qblora_pl.export.mlx_writer import pack_mlx_codes, write_mlx
from qblora_pl.export.native import write_native
from qblora_pl.quantization.native_checkpoint import load_native
from qblora_pl.export.snapshot import FROZEN_DENSE, QuantizedParts, snapshot_merged_model
from qblora_pl.export.verify import load_hf_dense
from qblora_pl.merging import merged
from qblora_pl.module import QuantizedCausalLM
from qblora_pl.paths import EMBEDDED_MODEL_DIR
from qblora_pl.quantization import GroupwiseInt
from qblora_pl.quantization.int_quantizer import GroupwiseIntQuantizer
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
# Measured (mlx-lm 0.32.2): quantized vs dense MLX export 0 (embedded model and SmolLM2).
SAME_RUNTIME_TOLERANCE = 1e-6
# Measured: mlx-lm vs load_native at most 7e-6 on the embedded model (INT2-4, g32-128), 6.5e-5 on
# SmolLM2 (30 layers, bench/mlx_exactness.py); float16 scales/biases give 1.3e-3 (embedded) to
# 1.2e-2 (SmolLM2); the packing's bit order reversed gives 5.9.
CROSS_RUNTIME_TOLERANCE = 3e-4
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


def export_both(module, tokenizer_source, out, *, dense_mlx: bool = False, **mlx_kwargs):
    """Native and MLX exports of the same merged snapshot (and, with ``dense_mlx``, an MLX export
    of it with every layer dense float32 under ``out / "mlx-dense"``); returns the first two
    directories and write_mlx's summary."""
    with merged(module.model):
        snapshot = snapshot_merged_model(module.model)
        write_native(snapshot, out / "native", tokenizer_source)
        info = write_mlx(snapshot, out / "mlx", tokenizer_source, **mlx_kwargs)
        if dense_mlx:
            for linear in snapshot.linears.values():
                linear.weight, linear.quantized, linear.origin = linear.dense_weight(), None, FROZEN_DENSE
            assert write_mlx(snapshot, out / "mlx-dense", tokenizer_source)["int_layers"] == 0
    return out / "native", out / "mlx", info


@torch.no_grad()
def max_diff_over_std(reference_model, other_model, prompts_ids) -> float:
    worst = 0.0
    for ids in prompts_ids:
        ours = reference_model(input_ids=torch.tensor([ids])).logits[0].float()
        theirs = other_model(input_ids=torch.tensor([ids])).logits[0].float()
        worst = max(worst, float((ours - theirs).abs().max() / ours.std()))
    return worst


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
    worst, greedy = max_diff_over_std(reference_model, mlx_model, prompts_ids), []
    for ids in prompts_ids:
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
    native_dir, mlx_dir, info = export_both(module, EMBEDDED_MODEL_DIR, tmp_path, dense_mlx=True)
    assert info["int_layers"] == 28 and info["dense_layers"] == 1  # the untied lm_head stays dense
    native, client = load_native(native_dir), load_mlx(mlx_dir)
    ids = prompt_ids(client.tokenizer)
    assert ids == prompt_ids(load_tokenizer(str(EMBEDDED_MODEL_DIR)))  # mlx-lm reads the copied tokenizer alike
    within = max_diff_over_std(load_mlx(tmp_path / "mlx-dense"), client, ids)
    worst, greedy = compare(native, client, ids)
    print(f"\nINT{bits} g{group_size}: {info['bits_per_quantized_weight']:.3f} bits/weight; max |logit diff| / std: "
          f"{within:.3g} vs the dense MLX export, {worst:.3g} vs load_native")
    assert within <= SAME_RUNTIME_TOLERANCE
    assert worst < CROSS_RUNTIME_TOLERANCE
    for prompt, (ours, theirs) in zip(PROMPTS, greedy):
        assert ours == theirs, f"{prompt!r}: greedy tokens differ (ours {ours}, mlx-lm {theirs})"

    # The merge is not trivial: the same base with zero adapters gives other logits.
    base = qablora_module(EMBEDDED_MODEL_DIR, bits, group_size, std=0.0).model.eval()
    with torch.no_grad():
        x = torch.tensor([ids[0]])
        ours = native(input_ids=x).logits
        assert float((ours - base(input_ids=x).logits).abs().max() / ours.std()) > 100 * CROSS_RUNTIME_TOLERANCE


def test_the_exporter_verifies_the_mlx_export_with_mlx_lm(tmp_path):
    """export_module(formats=[..., "mlx"]) loads the MLX export with mlx-lm for its verification."""
    import_mlx_lm()
    from qblora_pl.export import export_module
    from qblora_pl.export.mlx_loader import MLX_CLIENT

    module = qablora_module(EMBEDDED_MODEL_DIR, 3, 64)
    report = export_module(module, tmp_path / "exports", formats=["native", "mlx"], log=lambda _: None)
    native, mlx = (report["formats"][f]["verification"] for f in ("native", "mlx"))
    print(f"\nexport verification: mlx-lm max |logit diff| {mlx['max_abs_logit_diff']:.3g}, "
          f"load_native {native['max_abs_logit_diff']:.3g}")
    assert mlx["client"] == MLX_CLIENT and mlx["argmax_agreement"] == 1.0
    # 3e-4 of the embedded model's logit std (about 2.7) - the cross-runtime tolerance above.
    assert mlx["max_abs_logit_diff"] < 1e-3
    assert (tmp_path / "exports" / "mlx" / "model.safetensors").is_file()


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_padded_batches_as_the_export_verification_feeds_them(padding_side, tmp_path):
    """load_mlx in the exporter's verification: a padded batch (the embedded tokenizer pads on the
    left, SmolLM2's on the right) gives load_native's logits on every attended position."""
    import_mlx_lm()
    from qblora_pl.export.mlx_loader import load_mlx
    from qblora_pl.export.verify import SAMPLE_TEXTS, compare_logits, logits_and_perplexity

    module = qablora_module(EMBEDDED_MODEL_DIR, 4, 32)
    native_dir, mlx_dir, _ = export_both(module, EMBEDDED_MODEL_DIR, tmp_path)
    tokenizer = load_tokenizer(str(EMBEDDED_MODEL_DIR))
    tokenizer.padding_side = padding_side
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    encoded = tokenizer(list(SAMPLE_TEXTS), padding=True, return_tensors="pt")
    assert not bool(encoded["attention_mask"].all())  # the batch really is padded
    labels = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
    # Each row's first token is not predicted by anything real (after left padding, a pad position
    # would "predict" it; MLX gives pad positions zero logits): leave it out of the perplexity.
    labels[torch.arange(len(labels)), encoded["attention_mask"].argmax(-1)] = -100
    batch = {**encoded, "labels": labels}
    reference, reference_ppl = logits_and_perplexity(load_native(native_dir), batch)
    client = load_mlx(mlx_dir)
    logits, ppl = logits_and_perplexity(client, batch)
    result = compare_logits(reference, logits, batch)
    attended = batch["attention_mask"].bool()
    assert result["max_abs_logit_diff"] < CROSS_RUNTIME_TOLERANCE * float(reference[attended].std())
    assert result["argmax_agreement"] == 1.0 and ppl == pytest.approx(reference_ppl, rel=1e-5)

    holes = torch.ones_like(batch["attention_mask"])
    holes[1, 2] = 0
    with pytest.raises(ValueError, match="row 1"):
        client(input_ids=batch["input_ids"], attention_mask=holes)


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
    assert worst < CROSS_RUNTIME_TOLERANCE
    assert all(ours == theirs for ours, theirs in greedy)


@pytest.mark.parametrize("mistake", ["bit_order_reversed", "float16_scales_and_biases"])
def test_the_tolerance_catches_a_wrong_or_rounded_export(mistake, tmp_path, monkeypatch):
    """Negative controls: codes packed most-significant bit first (loads fine, computes garbage),
    and mlx-lm's usual 16-bit scales / biases (rounds the merged offsets) both exceed the tolerance."""
    import_mlx_lm()
    import qblora_pl.export.mlx_writer as mlx_writer
    from qblora_pl.export.mlx_loader import load_mlx

    def msb_first(codes, bits):
        flipped = torch.zeros_like(codes)
        for bit in range(bits):
            flipped |= ((codes >> bit) & 1) << (bits - 1 - bit)
        return pack_mlx_codes(flipped, bits)

    kwargs = {}
    if mistake == "bit_order_reversed":
        monkeypatch.setattr(mlx_writer, "pack_mlx_codes", msb_first)
    else:
        kwargs["scale_dtype"] = "float16"
    module = qablora_module(EMBEDDED_MODEL_DIR, 4, 32)
    native_dir, mlx_dir, _ = export_both(module, EMBEDDED_MODEL_DIR, tmp_path, **kwargs)
    client = load_mlx(mlx_dir)
    worst = max_diff_over_std(load_native(native_dir), client, prompt_ids(client.tokenizer))
    print(f"\n{mistake}: max |logit diff| / std = {worst:.3g}")
    assert worst > 2 * CROSS_RUNTIME_TOLERANCE


@pytest.mark.realmodel
def test_mlx_lm_answers_a_chat_prompt_like_our_loader_on_smollm2(smollm2_gguf, tmp_path):  # noqa: F811
    """SmolLM2-135M-Instruct, QA-BLoRA INT4 g32: mlx-lm and load_native agree on a chat prompt."""
    import_mlx_lm()
    from qblora_pl.export.mlx_loader import load_mlx
    from qblora_pl.sources import pretrained_name_or_path

    source = pretrained_name_or_path(str(smollm2_gguf))
    module = qablora_module(smollm2_gguf, 4, 32, std=0.02)
    native_dir, mlx_dir, info = export_both(module, source, tmp_path, dense_mlx=True)
    assert info["dense_layers"] == 0 and info["int_layers"] == 30 * 7  # tied head: read from embed_tokens
    native, client = load_native(native_dir), load_mlx(mlx_dir)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = list(client.tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    ours_ids = load_tokenizer(str(smollm2_gguf)).apply_chat_template(messages, add_generation_prompt=True,
                                                                     return_dict=False)
    assert ids == list(ours_ids), "mlx-lm renders the chat prompt differently"
    within = max_diff_over_std(load_mlx(tmp_path / "mlx-dense"), client, [ids])
    worst, [(ours, theirs)] = compare(native, client, [ids])
    answer = client.tokenizer.decode(theirs)
    print(f"\nSmolLM2 QA-BLoRA INT4 g32: {info['bytes'] / 2**20:.1f} MiB; max |logit diff| / std: {within:.3g} vs "
          f"the dense MLX export, {worst:.3g} vs load_native; mlx-lm answers {answer!r}")
    assert within <= SAME_RUNTIME_TOLERANCE
    assert worst < CROSS_RUNTIME_TOLERANCE
    assert ours == theirs, f"greedy tokens differ: ours {ours}, mlx-lm {theirs}"
    assert "Paris" in answer
