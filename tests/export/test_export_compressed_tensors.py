"""compressed-tensors ``pack-quantized`` export (issue 33): the packed bytes are compressed-tensors'
own, and transformers + compressed-tensors load the folder to the logits of the model as trained with
integer zero points; a model whose offsets are not on the integer grid is refused unless rounding is asked for."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from qblora_pl.adapters.injection import adapted_layers
from qblora_pl.export.compressed_tensors_writer import (
    CT_CONFIG_FILE,
    CT_WEIGHTS_FILE,
    ZeroPointRoundingError,
    integer_zero_points,
    pack_int32_rows,
    write_compressed_tensors,
)
from qblora_pl.export.exporter import CT_DIR, export_merged
from qblora_pl.export.snapshot import snapshot_merged_model
from qblora_pl.export.verify import fixed_token_batch
from qblora_pl.merging import merged
from qblora_pl.qat import MergedOffsetFakeQuant
from tests.export.conftest import adapted_module

compressed_tensors = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32  # noqa: E402


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packing_is_compressed_tensors_own_along_rows_and_columns(bits):
    generator = torch.Generator().manual_seed(bits)
    values = torch.randint(0, 1 << bits, (6, 72), generator=generator)  # 72 * 3 bits: a word boundary mid-value
    signed = (values - (1 << (bits - 1))).to(torch.int8)
    assert torch.equal(pack_int32_rows(values, bits), pack_to_int32(signed, bits, packed_dim=1))
    # zero points are packed along the output dimension
    assert torch.equal(pack_int32_rows(values.T.contiguous(), bits).T.contiguous(), pack_to_int32(signed, bits, packed_dim=0))


def test_packing_names_values_out_of_range():
    with pytest.raises(ValueError, match="outside 0..3"):
        pack_int32_rows(torch.tensor([[0, 4]]), 2)
    with pytest.raises(ValueError, match="bits=5"):
        pack_int32_rows(torch.tensor([[0, 1]]), 5)


def _train_with_integer_zero_points(module):
    """What QATSchedule(zero_point: integer) leaves on each layer at full strength."""
    for layer in adapted_layers(module.model).values():
        layer.fake_quant = MergedOffsetFakeQuant(zero_point="integer", strength=1.0)


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_integer_zero_point_model_loads_in_transformers_with_the_trained_logits(bits, group_size, wide_model_dir, tmp_path):
    module = adapted_module(wide_model_dir, "qablora", bits=bits, group_size=group_size, std=0.05)
    _train_with_integer_zero_points(module)
    batch = fixed_token_batch(module.model.config.vocab_size)
    module.model.eval()
    with torch.no_grad():
        trained = module.model(**batch).logits  # the QAT forward: rounded zero points
    report = export_merged(module.model, tmp_path / "out", wide_model_dir, formats=["compressed-tensors"],
                           batch=batch, log=lambda _: None)
    info = report["formats"]["compressed-tensors"]
    assert info["zero_points_rounded"] and info["rounding_reason"] == "trained with QATSchedule zero_point: integer"

    from qblora_pl.export.compressed_tensors_writer import load_compressed_tensors

    loaded = load_compressed_tensors(tmp_path / "out" / CT_DIR)
    with torch.no_grad():
        served = loaded(**batch).logits
    mask = batch["attention_mask"].bool()
    assert (served - trained)[mask].abs().max() < 1e-5
    assert torch.equal(served.argmax(-1)[mask], trained.argmax(-1)[mask])

    config = json.loads((tmp_path / "out" / CT_DIR / CT_CONFIG_FILE).read_text())["quantization_config"]
    weights = config["config_groups"]["group_0"]["weights"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    assert (weights["num_bits"], weights["group_size"], weights["strategy"]) == (bits, group_size, "group")
    assert config["ignore"] == ["lm_head"] and info["int_layers"] == 14 and info["dense_layers"] == 0


def test_the_packed_layer_is_what_compressed_tensors_compressor_writes(wide_model_dir, tmp_path):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    module = adapted_module(wide_model_dir, "qablora", bits=3, group_size=32, std=0.05)
    with merged(module.model):
        snapshot = snapshot_merged_model(module.model)
        write_compressed_tensors(snapshot, tmp_path / "ct", wide_model_dir, round_zero_points=True)
    name = "model.layers.1.mlp.down_proj"
    parts = snapshot.linears[name].quantized
    zero, rounded_offsets, _ = integer_zero_points(parts)
    scale = parts.scales.float()
    weight = (parts.codes.float().reshape(*scale.shape, -1) - zero.unsqueeze(-1)) * scale.unsqueeze(-1)
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(num_bits=3, type="int", symmetric=False,
                                                                             strategy="group", group_size=32))
    theirs = PackedQuantizationCompressor.compress(
        {"weight": weight.reshape(parts.codes.shape), "weight_scale": scale,
         "weight_zero_point": (zero - 4).to(torch.int8)}, scheme)
    ours = load_file(str(tmp_path / "ct" / CT_WEIGHTS_FILE))
    for key in ("weight_packed", "weight_zero_point", "weight_scale", "weight_shape"):
        assert torch.equal(ours[f"{name}.{key}"], theirs[key]), key


def test_offsets_off_the_integer_grid_are_refused_naming_the_worst_layer_and_the_ways_out(wide_model_dir, tmp_path):
    module = adapted_module(wide_model_dir, "qablora", bits=4, group_size=32)
    with pytest.raises(ZeroPointRoundingError, match=r"largest rounding would change an offset by .* \(model\.layers\.") as err:
        export_merged(module.model, tmp_path / "out", wide_model_dir, formats=["compressed-tensors"], log=lambda _: None)
    assert "zero_point: integer" in str(err.value) and "round_zero_points" in str(err.value)
    assert not (tmp_path / "out").exists()  # nothing written
    report = export_merged(module.model, tmp_path / "out", wide_model_dir, formats=["compressed-tensors"],
                           round_zero_points=True, log=lambda _: None)
    info = report["formats"]["compressed-tensors"]
    assert info["zero_points_rounded"] and info["max_abs_weight_change"] > 0
    assert info["verification"]["max_abs_logit_diff"] > 0  # what the rounding cost, measured


def test_symmetric_zero_points_are_written_symmetric(wide_model_dir, tmp_path):
    module = adapted_module(wide_model_dir, "qablora", bits=4, group_size=32, std=0.0)
    for layer in adapted_layers(module.model).values():  # every zero point 8: offset = -8 * scale
        layer.base_layer.offsets = -8.0 * layer.base_layer.scales.float()
    with merged(module.model):
        info = write_compressed_tensors(snapshot_merged_model(module.model), tmp_path / "ct", wide_model_dir)
    tensors = load_file(str(tmp_path / "ct" / CT_WEIGHTS_FILE))
    assert not [k for k in tensors if k.endswith("weight_zero_point")]
    assert info["quantization_config"]["config_groups"]["group_0"]["weights"]["symmetric"] is True
    assert not info["zero_points_rounded"]


def test_dense_merges_stay_dense_in_ignore_or_are_requantized_with_a_warning(tiny_model_dir, tmp_path):
    from qblora_pl.export.snapshot import ExportFallbackWarning

    module = adapted_module(tiny_model_dir, "qlora")
    with merged(module.model):
        snapshot = snapshot_merged_model(module.model)
        info = write_compressed_tensors(snapshot, tmp_path / "dense", tiny_model_dir)
        assert info["int_layers"] == 0 and "model.layers.0.mlp.up_proj" in info["quantization_config"]["ignore"]
        with pytest.warns(ExportFallbackWarning, match="re-quantized to INT4 g32"):
            info = write_compressed_tensors(snapshot, tmp_path / "rq", tiny_model_dir, fallback="requantize")
    assert info["int_layers"] == 14 and info["quantization_config"]["ignore"] == ["lm_head"]
    assert 0 < max(info["requantized_layers"].values()) < 0.2


def test_a_qlora_model_reaches_the_format_through_round_to_nearest(tiny_model_dir, tmp_path):
    from qblora_pl.export.snapshot import ExportFallbackWarning

    module = adapted_module(tiny_model_dir, "qlora", std=0.05)
    with pytest.warns(ExportFallbackWarning, match="re-quantized to INT3 g32"):
        report = export_merged(module.model, tmp_path / "out", tiny_model_dir, formats=["compressed-tensors"],
                               native_bits=3, log=lambda _: None)
    info = report["formats"]["compressed-tensors"]
    assert info["int_layers"] == 14 and not info["zero_points_rounded"]  # RTN with integer zero points: nothing to round
    assert info["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] == 3
    assert 0 < info["verification"]["max_abs_logit_diff"] < 1.0  # the re-quantization's cost, measured
