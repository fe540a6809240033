"""GGUF export: Q4_1 bytes match ggml's layout, q/k rows follow llama.cpp, the merge stays exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qblora_pl.export import export_module, llama_permute_rows, pack_q4_1
from qblora_pl.export.gguf_writer import llama_unpermute_rows
from qblora_pl.export.verify import fixed_token_batch, load_gguf, load_gguf_with_reader
from qblora_pl.merging import merged

gguf = pytest.importorskip("gguf")
Q4_1 = gguf.GGMLQuantizationType.Q4_1


def test_q4_1_packing_is_bit_exact_against_gguf_quants():
    g = torch.Generator().manual_seed(0)
    rows, n = 6, 128
    codes = torch.randint(0, 16, (rows, n), generator=g, dtype=torch.uint8)
    d = (torch.rand(rows, n // 32, generator=g) * 0.1).to(torch.float16)
    m = (torch.randn(rows, n // 32, generator=g) * 0.1).to(torch.float16)
    packed = pack_q4_1(codes, d, m)
    assert packed.shape == (rows, n // 32 * 20) and packed.dtype == np.uint8

    # gguf's numpy dequantizer reads exactly w = d * q + m from our bytes (fp32 arithmetic).
    expected = codes.float().reshape(rows, -1, 32) * d.float().unsqueeze(-1) + m.float().unsqueeze(-1)
    assert np.array_equal(gguf.quants.dequantize(packed, Q4_1), expected.reshape(rows, n).numpy())

    # And the other way round: gguf's own Q4_1 bytes, split by our reading of block_q4_1, repack identically.
    reference = gguf.quants.quantize(torch.randn(rows, n, generator=g).numpy(), Q4_1)
    blocks = torch.from_numpy(reference.reshape(rows, n // 32, 20).copy())
    d2 = blocks[..., 0:2].contiguous().view(torch.float16).squeeze(-1)
    m2 = blocks[..., 2:4].contiguous().view(torch.float16).squeeze(-1)
    qs = blocks[..., 4:]
    codes2 = torch.cat([qs & 0x0F, qs >> 4], dim=-1).reshape(rows, n)
    assert np.array_equal(pack_q4_1(codes2, d2, m2), reference)


@pytest.mark.parametrize("n_head, n_head_kv", [(4, 4), (4, 2)])
def test_llama_permutation_matches_convert_script_and_inverts(n_head, n_head_kv):
    head_dim = 8
    rows = n_head_kv * head_dim
    w = torch.arange(rows * 3, dtype=torch.float32).reshape(rows, 3)
    permuted = llama_permute_rows(w, n_head, n_head_kv)
    # convert_hf_to_gguf.py: within a head, rotate-half pairs (i, i + head_dim/2) become rows (2i, 2i+1).
    half = head_dim // 2
    for h in range(n_head_kv):
        for i in range(half):
            assert torch.equal(permuted[h * head_dim + 2 * i], w[h * head_dim + i])
            assert torch.equal(permuted[h * head_dim + 2 * i + 1], w[h * head_dim + half + i])
    assert torch.equal(llama_unpermute_rows(permuted, n_head, n_head_kv), w)


def test_gguf_export_of_qablora_is_exact_q4_1(qablora_gqa_module, tmp_path):
    module = qablora_gqa_module
    config = module.model.config
    with merged(module.model):
        merged_weights = {
            name: layer.base_layer.dequantize()
            for name, layer in module.adapted_layers().items()
        }
    report = export_module(module, tmp_path, formats=["gguf"], log=lambda _: None)
    info = report["formats"]["gguf"]
    assert info["fallback_layers"] == [] and info["exact_q4_1_layers"] == len(merged_weights)

    reader = gguf.GGUFReader(str(tmp_path / "model.gguf"))
    field = lambda key: reader.get_field(key).contents()  # noqa: E731
    assert field("general.architecture") == "llama"
    assert field("llama.attention.head_count") == 4 and field("llama.attention.head_count_kv") == 2
    assert field("llama.block_count") == 2 and field("llama.embedding_length") == 64
    assert field("llama.feed_forward_length") == 128 and field("llama.context_length") == 256
    assert field("llama.vocab_size") == config.vocab_size
    tensors = {t.name: t for t in reader.tensors}
    assert {"token_embd.weight", "output_norm.weight", "output.weight", "blk.1.ffn_down.weight"} <= set(tensors)

    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    offset_rounding = info["max_abs_offset_rounding"]
    assert 0 < offset_rounding < 1e-3  # merged float32 offsets rounded to fp16: the only loss
    for name, weight in merged_weights.items():
        block, short = int(name.split(".")[2]), name.rsplit(".", 1)[-1]
        tensor = tensors[f"blk.{block}.{names[short]}.weight"]
        assert tensor.tensor_type == Q4_1
        values = torch.from_numpy(gguf.quants.dequantize(tensor.data, Q4_1).copy())
        if short == "q_proj":
            weight = llama_permute_rows(weight, 4, 4)
        elif short == "k_proj":
            weight = llama_permute_rows(weight, 4, 2)
        # fp16 d and m: scales were fp16 already, offsets round by at most offset_rounding.
        assert (values - weight).abs().max() <= offset_rounding + 1e-6

    check = info["verification"]
    assert check["client"] == "transformers GGUF loader"
    assert check["max_abs_logit_diff"] < 0.05 and check["argmax_agreement"] == 1.0


def test_gguf_reader_fallback_client_agrees_with_transformers(qablora_gqa_module, tmp_path):
    export_module(qablora_gqa_module, tmp_path, formats=["gguf"], verify=False, log=lambda _: None)
    ids = fixed_token_batch(qablora_gqa_module.model.config.vocab_size)["input_ids"]
    ours = load_gguf_with_reader(tmp_path / "model.gguf")
    theirs, client = load_gguf(tmp_path / "model.gguf")
    assert client == "transformers GGUF loader"
    assert ours.config.num_key_value_heads == 2 and ours.config.max_position_embeddings == 256
    with torch.no_grad():
        a, b = ours(input_ids=ids).logits, theirs(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-5, rtol=0)


def test_int4_group_64_maps_onto_two_q4_1_blocks_exactly(gqa_model_dir, tmp_path):
    from tests.export.conftest import adapted_module

    module = adapted_module(gqa_model_dir, "qablora", group_size=64)
    with merged(module.model):
        down = module.model.get_submodule("model.layers.0.mlp.down_proj").base_layer.dequantize()
    report = export_module(module, tmp_path, formats=["gguf"], verify=False, log=lambda _: None)
    info = report["formats"]["gguf"]
    assert info["fallback_layers"] == [] and info["layer_types"]["Q4_1"] == 14
    tensor = next(t for t in gguf.GGUFReader(str(tmp_path / "model.gguf")).tensors if t.name == "blk.0.ffn_down.weight")
    values = torch.from_numpy(gguf.quants.dequantize(tensor.data, Q4_1).copy())
    assert (values - down).abs().max() <= info["max_abs_offset_rounding"] + 1e-6
