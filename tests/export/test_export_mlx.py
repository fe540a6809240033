"""MLX export without MLX: the uint32 packing, decoded by a reference decoder written here from
MLX's documented layout, gives back our dequantized INT-b weights bit for bit at every width and
group; config.json carries mlx-lm's quantization block. (mlx-lm itself runs the exports in
test_export_mlx_runtime.py, ``pytest -m integration``.)"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from qblora_pl.export.mlx_writer import (
    MLX_CONFIG_FILE,
    MLX_WEIGHTS_FILE,
    mlx_quantization_block,
    pack_mlx_codes,
    write_mlx,
)
from qblora_pl.export.snapshot import ExportFallbackWarning, QuantizedParts, snapshot_merged_model
from qblora_pl.merging import merged
from qblora_pl.quantization.base_layers import dequantized_weight
from tests.export.conftest import adapted_module


def decode_mlx_weight(words: np.ndarray, bits: int, d_in: int) -> np.ndarray:
    """Reference decoder of MLX's affine weight: each row is a little-endian bit stream of
    ``bits``-bit codes, least significant bit first, cut into uint32 words."""
    rows = words.shape[0]
    stream = np.unpackbits(words.astype("<u4").view(np.uint8), axis=-1, bitorder="little")
    planes = stream.reshape(rows, d_in, bits).astype(np.int64)
    return (planes << np.arange(bits)).sum(-1)


def dequantize_reference(codes: np.ndarray, scales: np.ndarray, biases: np.ndarray, group_size: int) -> np.ndarray:
    """``w = scales * q + biases`` per group, float32, product then sum (as mx.dequantize)."""
    rows, d_in = codes.shape
    q = codes.astype(np.float32).reshape(rows, d_in // group_size, group_size)
    return (q * scales.astype(np.float32)[..., None] + biases.astype(np.float32)[..., None]).reshape(rows, d_in)


def test_packing_by_hand():
    # 2 bits: 16 codes per word, code j at bits 2j..2j+1.
    codes = torch.zeros(1, 32, dtype=torch.uint8)
    codes[0, 0], codes[0, 15], codes[0, 16] = 1, 3, 2
    assert pack_mlx_codes(codes, 2).tolist() == [[1 | 3 << 30, 2]]
    # 4 bits: 8 codes per word.
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 15] * 4], dtype=torch.uint8)
    assert pack_mlx_codes(codes, 4)[0, 0].item() == 0xF7654321
    # 3 bits: 32 codes fill 3 words; code 10 sits at bits 30..32 and straddles words 0 and 1.
    codes = torch.zeros(1, 32, dtype=torch.uint8)
    codes[0, 10], codes[0, 31] = 7, 5  # code 31: bits 93..95 = word 2 bits 29..31
    assert pack_mlx_codes(codes, 3).tolist() == [[0xC0000000, 0x1, 5 << 29]]
    # 8 bits: bytes in little-endian order.
    codes = torch.tensor([[0x11, 0x22, 0x33, 0x44] * 8], dtype=torch.uint8)
    assert pack_mlx_codes(codes, 8)[0, 0].item() == 0x44332211


def test_packing_rejects_what_mlx_cannot_hold():
    with pytest.raises(ValueError, match="bits=7"):
        pack_mlx_codes(torch.zeros(1, 32, dtype=torch.uint8), 7)
    with pytest.raises(ValueError, match="codes reach 4"):
        pack_mlx_codes(torch.full((1, 32), 4, dtype=torch.uint8), 2)
    with pytest.raises(ValueError, match="d_in=20"):
        pack_mlx_codes(torch.zeros(1, 20, dtype=torch.uint8), 4)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_reference_decoder_inverts_the_packing_on_random_codes(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (5, 256), generator=g, dtype=torch.uint8)
    words = pack_mlx_codes(codes, bits)
    assert words.dtype == torch.uint32 and tuple(words.shape) == (5, 256 * bits // 32)
    assert np.array_equal(decode_mlx_weight(words.numpy(), bits, 256), codes.numpy())




@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_qablora_export_decodes_to_the_merged_weights(bits, group_size, wide_model_dir, tmp_path):
    module = adapted_module(wide_model_dir, "qablora", bits=bits, group_size=group_size)
    with merged(module.model):
        snapshot = snapshot_merged_model(module.model)
        merged_weights = {name: dequantized_weight(module.model.get_submodule(name).base_layer).clone()
                          for name in snapshot.linears if name != "lm_head"}
        info = write_mlx(snapshot, tmp_path / "mlx", wide_model_dir)
    with torch.no_grad():
        unmerged_q = dequantized_weight(module.model.get_submodule("model.layers.0.self_attn.q_proj").base_layer)
    assert not torch.equal(unmerged_q, merged_weights["model.layers.0.self_attn.q_proj"])  # the merge did something

    tensors = load_file(str(tmp_path / "mlx" / MLX_WEIGHTS_FILE))
    for name, expected in merged_weights.items():
        d_out, d_in = expected.shape
        words, scales, biases = (tensors[f"{name}.{k}"] for k in ("weight", "scales", "biases"))
        assert words.dtype == torch.uint32 and tuple(words.shape) == (d_out, d_in * bits // 32)
        assert scales.dtype == biases.dtype == torch.float32
        assert tuple(scales.shape) == tuple(biases.shape) == (d_out, d_in // group_size)
        codes = decode_mlx_weight(words.numpy(), bits, d_in)
        assert codes.max() < 1 << bits
        decoded = dequantize_reference(codes, scales.numpy(), biases.numpy(), group_size)
        assert np.array_equal(decoded, expected.numpy()), f"{name}: decoded weight differs from the merged layer"
    # Tied embeddings: mlx-lm's llama reads the head from embed_tokens, so no lm_head tensor.
    assert "lm_head.weight" not in tensors and "model.embed_tokens.weight" in tensors
    assert tensors["model.embed_tokens.weight"].dtype == torch.float32  # dense, as in the source

    config = json.loads((tmp_path / "mlx" / MLX_CONFIG_FILE).read_text())
    assert config["quantization"] == {"group_size": group_size, "bits": bits, "mode": "affine"}
    assert config["quantization_config"] == config["quantization"]
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is True
    assert config["rope_theta"] == 50000.0  # mlx-lm reads it from the top level only
    assert info["int_layers"] == 14 and info["dense_layers"] == 0
    assert info["max_abs_scale_rounding"] == info["max_abs_bias_rounding"] == info["max_abs_weight_error"] == 0.0
    assert info["bits_per_quantized_weight"] == pytest.approx(bits + 2 * 32 / group_size)
    assert (tmp_path / "mlx" / "tokenizer.json").is_file()


def test_untied_head_and_16_bit_scales(tiny_model_dir, tmp_path):
    module = adapted_module(tiny_model_dir, "qablora", bits=4, group_size=32)
    with merged(module.model):
        snapshot = snapshot_merged_model(module.model)
        info = write_mlx(snapshot, tmp_path / "mlx", tiny_model_dir, scale_dtype="float16")
    tensors = load_file(str(tmp_path / "mlx" / MLX_WEIGHTS_FILE))
    head = snapshot.linears["lm_head"]
    assert torch.equal(tensors["lm_head.weight"], head.weight) and "lm_head.scales" not in tensors
    assert info["layers"]["lm_head"]["storage"] == "dense"
    # Merged offsets are float32; storing them in float16 rounds them, and the report says by how much.
    q = snapshot.linears["model.layers.1.mlp.down_proj"].quantized
    stored = tensors["model.layers.1.mlp.down_proj.biases"]
    assert stored.dtype == torch.float16
    assert info["max_abs_bias_rounding"] == pytest.approx(
        max(float((s.quantized.offsets - s.quantized.offsets.half().float()).abs().max())
            for s in snapshot.linears.values() if s.is_quantized))
    assert info["max_abs_bias_rounding"] > 0  # scales were float16 already: the weights move by the bias rounding
    assert info["max_abs_weight_error"] == pytest.approx(info["max_abs_bias_rounding"], rel=1e-2)
    assert torch.equal(stored, q.offsets.half())
    assert info["bits_per_quantized_weight"] == pytest.approx(4 + 2 * 16 / 32)


def test_layers_of_other_widths_get_per_layer_entries(tiny_model_dir, tmp_path):
    module = adapted_module(tiny_model_dir, "qablora", bits=4, group_size=32)
    with merged(module.model):
        snapshot = snapshot_merged_model(module.model)
    odd = snapshot.linears["model.layers.1.mlp.up_proj"]
    codes = torch.randint(0, 8, (odd.d_out, odd.d_in), dtype=torch.uint8)
    ones = torch.ones(odd.d_out, odd.d_in // 64)
    odd.quantized = QuantizedParts(codes, ones * 0.01, ones * -0.03, bits=3, group_size=64)
    write_mlx(snapshot, tmp_path / "mlx", tiny_model_dir)
    block = json.loads((tmp_path / "mlx" / MLX_CONFIG_FILE).read_text())["quantization"]
    assert block == {"group_size": 32, "bits": 4, "mode": "affine",
                     "model.layers.1.mlp.up_proj": {"group_size": 64, "bits": 3, "mode": "affine"}}
    words = load_file(str(tmp_path / "mlx" / MLX_WEIGHTS_FILE))["model.layers.1.mlp.up_proj.weight"]
    assert np.array_equal(decode_mlx_weight(words.numpy(), 3, odd.d_in), codes.numpy())


def test_quantization_block_is_none_for_an_all_dense_model():
    layers = {"a": {"storage": "dense"}, "b": {"storage": "dense"}}
    assert mlx_quantization_block(layers) is None


def test_dense_merges_stay_dense_or_are_requantized_with_a_warning(tiny_model_dir, tmp_path):
    module = adapted_module(tiny_model_dir, "qlora")  # NF4 + LoRA: a dense merge
    with merged(module.model):
        snapshot = snapshot_merged_model(module.model)
        q_proj = snapshot.linears["model.layers.0.self_attn.q_proj"].dense_weight().clone()
        with warnings.catch_warnings():
            warnings.simplefilter("error", ExportFallbackWarning)
            dense = write_mlx(snapshot, tmp_path / "dense", tiny_model_dir)
        with pytest.warns(ExportFallbackWarning, match="re-quantized to INT4 g64"):
            requantized = write_mlx(snapshot, tmp_path / "rtn", tiny_model_dir, fallback="requantize", bits=4, group_size=64)
    assert dense["int_layers"] == 0 and dense["quantization"] is None
    assert "quantization" not in json.loads((tmp_path / "dense" / MLX_CONFIG_FILE).read_text())
    assert torch.equal(load_file(str(tmp_path / "dense" / MLX_WEIGHTS_FILE))["model.layers.0.self_attn.q_proj.weight"], q_proj)
    assert requantized["int_layers"] == 14 and requantized["dense_layers"] == 1  # the frozen lm_head stays dense
    errors = requantized["requantized_layers"]
    assert set(errors) == {n for n in snapshot.linears if n != "lm_head"} and 0 < max(errors.values()) < 0.2


def test_bad_arguments_are_named(tiny_model_dir, tmp_path):
    module = adapted_module(tiny_model_dir, "qablora")
    with merged(module.model):
        snapshot = snapshot_merged_model(module.model)
    with pytest.raises(ValueError, match="'float64'"):
        write_mlx(snapshot, tmp_path / "a", tiny_model_dir, scale_dtype="float64")
    with pytest.raises(ValueError, match="'f16'"):
        write_mlx(snapshot, tmp_path / "b", tiny_model_dir, fallback="f16")
    snapshot.config.model_type = "gpt2"
    with pytest.raises(ValueError, match="'gpt2'"):
        write_mlx(snapshot, tmp_path / "c", tiny_model_dir)
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_a_failed_write_leaves_the_previous_export(tiny_model_dir, tmp_path, monkeypatch):
    import qblora_pl.export.mlx_writer as mlx_writer

    module = adapted_module(tiny_model_dir, "qablora")
    with merged(module.model):
        snapshot = snapshot_merged_model(module.model)
    write_mlx(snapshot, tmp_path / "mlx", tiny_model_dir)
    before = (tmp_path / "mlx" / MLX_WEIGHTS_FILE).read_bytes()

    def broken(tensors, filename, metadata=None):
        open(filename, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(mlx_writer, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        write_mlx(snapshot, tmp_path / "mlx", tiny_model_dir)
    assert (tmp_path / "mlx" / MLX_WEIGHTS_FILE).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlx"]


def test_rope_settings_move_to_where_mlx_lm_reads_them():
    from transformers import LlamaConfig

    from qblora_pl.export.mlx_writer import mlx_config
    from qblora_pl.export.snapshot import ModelSnapshot

    linear = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                         rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0})
    config = mlx_config(ModelSnapshot(config=linear, linears={}, others={}), None)
    assert config["rope_theta"] == 500000.0
    assert config["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    assert "quantization" not in config and "quantization_config" not in config

    default = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4)
    config = mlx_config(ModelSnapshot(config=default, linears={}, others={}), {"bits": 4})
    assert config["rope_theta"] == 10000.0 and not config.get("rope_scaling")
    assert config["quantization"] == config["quantization_config"] == {"bits": 4}


def test_mlx_is_exported_when_named_and_not_by_default(tiny_model_dir, tmp_path):
    from qblora_pl.export.exporter import EXPORT_FORMATS, check_formats, export_module

    assert "mlx" not in EXPORT_FORMATS  # the default formats need no MLX to verify
    assert check_formats(["native", "mlx"]) == ["native", "mlx"]
    with pytest.raises(ValueError, match="'mlx2'"):
        check_formats(["mlx2"])
    module = adapted_module(tiny_model_dir, "qablora")
    report = export_module(module, tmp_path / "exports", formats=["mlx"], verify=False, log=lambda _: None)
    written = report["formats"]["mlx"]
    assert written["path"] == str(tmp_path / "exports" / "mlx") and written["int_layers"] == 14
    config = json.loads((tmp_path / "exports" / "mlx" / MLX_CONFIG_FILE).read_text())
    assert config["quantization"] == {"group_size": 32, "bits": 4, "mode": "affine"}
