"""Quantized checkpoints in (issue 33): a compressed-tensors pack-quantized folder loads as the GroupwiseInt
base exactly, fine-tunes, and exports back to the same bytes when the adapters are zero."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from qblora_pl.adapters import QABLoRA
from qblora_pl.adapters.injection import adapted_layers
from qblora_pl.export.compressed_tensors_writer import CT_WEIGHTS_FILE, load_compressed_tensors, pack_int32_rows
from qblora_pl.export.exporter import CT_DIR, export_merged, export_module
from qblora_pl.export.verify import fixed_token_batch
from qblora_pl.module import QuantizedCausalLM
from qblora_pl.qat import MergedOffsetFakeQuant
from qblora_pl.quantization import GroupwiseInt
from qblora_pl.quantization.int_layer import GroupwiseIntLinear
from qblora_pl.quantization.quantized_checkpoints import is_compressed_tensors_checkpoint, unpack_int32_rows
from tests.export.conftest import adapted_module

pytest.importorskip("compressed_tensors")


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_unpack_inverts_the_packing(bits):
    values = torch.randint(0, 1 << bits, (5, 40), generator=torch.Generator().manual_seed(bits))
    assert torch.equal(unpack_int32_rows(pack_int32_rows(values, bits), bits, 40), values.to(torch.uint8))


@pytest.fixture(scope="module", params=[(3, 32), (4, 64)], ids=["int3_g32", "int4_g64"])
def ct_folder(request, wide_model_dir, tmp_path_factory):
    """A QA-BLoRA model trained with integer zero points, exported to compressed-tensors."""
    bits, group_size = request.param
    module = adapted_module(wide_model_dir, "qablora", bits=bits, group_size=group_size, std=0.05)
    for layer in adapted_layers(module.model).values():
        layer.fake_quant = MergedOffsetFakeQuant(zero_point="integer", strength=1.0)
    out = tmp_path_factory.mktemp("ct")
    export_merged(module.model, out, wide_model_dir, formats=["compressed-tensors"], verify=False, log=lambda _: None)
    return out / CT_DIR, bits, group_size


def test_folder_loads_as_the_base_with_the_checkpoint_weights_and_logits(ct_folder):
    folder, bits, group_size = ct_folder
    assert is_compressed_tensors_checkpoint(folder)
    base = GroupwiseInt(bits=bits, group_size=group_size).load(str(folder))
    reference = load_compressed_tensors(folder)
    layers = {n: m for n, m in base.named_modules() if isinstance(m, GroupwiseIntLinear)}
    assert len(layers) == 14 and base.quantization_source["max_abs_diff_vs_transformers"] == 0.0
    for name, layer in layers.items():
        assert torch.equal(layer.dequantize(), reference.get_submodule(name).weight.float()), name
    batch = fixed_token_batch(base.config.vocab_size)
    with torch.no_grad():
        ours, theirs = base(**batch).logits, reference(**batch).logits
    mask = batch["attention_mask"].bool()
    assert (ours - theirs)[mask].abs().max() < 1e-5


def test_zero_adapters_export_back_to_the_same_bytes(ct_folder, tmp_path):
    folder, bits, group_size = ct_folder
    module = QuantizedCausalLM(str(folder), quantization=GroupwiseInt(bits=bits, group_size=group_size),
                               adapter=QABLoRA(budget_rank=4, dropout=0.0))
    module.configure_model()  # QA-BLoRA's matrix starts at zero: the merged model is the checkpoint
    export_module(module, tmp_path / "again", formats=["compressed-tensors"], verify=False, log=lambda _: None)
    before, after = load_file(str(folder / CT_WEIGHTS_FILE)), load_file(str(tmp_path / "again" / CT_DIR / CT_WEIGHTS_FILE))
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key


def test_another_bit_width_or_a_calibrating_init_is_refused_by_name(ct_folder):
    folder, bits, group_size = ct_folder
    with pytest.raises(ValueError, match=rf"num_bits={bits}, group_size={group_size}.*GroupwiseInt\(bits=2"):
        GroupwiseInt(bits=2, group_size=group_size).load(str(folder))
    with pytest.raises(ValueError, match="already quantized compressed-tensors checkpoint"):
        GroupwiseInt(bits=bits, group_size=group_size, init="mse").load(str(folder))
