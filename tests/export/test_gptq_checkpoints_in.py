"""GPTQ checkpoints in (issue 33): an AutoGPTQ / GPTQModel folder (sym or asym, checkpoint_format gptq (v1) or
gptq_v2, no act-order) loads as the GroupwiseInt base exactly. The folders are written here from a known base
in GPTQ's layout (qweight packed down the input dimension, qzeros along the output, v1's zero minus one)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from qblora_pl.export.compressed_tensors_writer import pack_int32_rows
from qblora_pl.export.verify import fixed_token_batch
from qblora_pl.quantization import GroupwiseInt
from qblora_pl.quantization.int_layer import GroupwiseIntLinear


def write_gptq_folder(source_dir, out, bits, group_size, *, sym, checkpoint_format, seed=0):
    """A GPTQ folder of ``source_dir``'s model quantized to an integer-zero-point base; returns that base."""
    base = GroupwiseInt(bits=bits, group_size=group_size).load(str(source_dir))
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    low = 1 if checkpoint_format == "gptq" else 0  # v1 cannot store z = 0 (it would read back as 2^b)
    for name, layer in [(n, m) for n, m in base.named_modules() if isinstance(m, GroupwiseIntLinear)]:
        shape = layer.scales.shape
        zero = (torch.full(shape, 1 << (bits - 1)) if sym
                else torch.randint(low, 1 << bits, shape, generator=generator))
        layer.offsets = -layer.scales.float() * zero.float()
        stored = (zero - 1) & ((1 << bits) - 1) if checkpoint_format == "gptq" else zero
        tensors[f"{name}.qweight"] = pack_int32_rows(layer.codes(), bits).T.contiguous()
        tensors[f"{name}.qzeros"] = pack_int32_rows(stored.T.contiguous(), bits)
        tensors[f"{name}.scales"] = layer.scales.detach().T.contiguous()
        tensors[f"{name}.g_idx"] = (torch.arange(layer.in_features) // group_size).to(torch.int32)
    for key, value in base.state_dict().items():
        if not any(key.startswith(n + ".") for n in [k[: -len(".qweight")] for k in tensors if k.endswith(".qweight")]):
            tensors.setdefault(key, value.contiguous())
    tensors.pop("lm_head.weight", None)  # tied
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"))
    config = json.loads((source_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": False,
                                     "sym": sym, "checkpoint_format": checkpoint_format}
    (out / "config.json").write_text(json.dumps(config))
    for path in source_dir.iterdir():
        if path.name.startswith("tokenizer") or path.name == "special_tokens_map.json":
            shutil.copy2(path, out / path.name)
    return base


@pytest.mark.parametrize("checkpoint_format", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("bits,group_size", [(4, 32), (3, 64), (2, 128), (8, 32)])
def test_gptq_folder_loads_as_the_base_it_was_written_from(bits, group_size, sym, checkpoint_format, wide_model_dir, tmp_path):
    expected = write_gptq_folder(wide_model_dir, tmp_path / "gptq", bits, group_size, sym=sym,
                                 checkpoint_format=checkpoint_format)
    loaded = GroupwiseInt(bits=bits, group_size=group_size).load(str(tmp_path / "gptq"))
    ours = {n: m for n, m in loaded.named_modules() if isinstance(m, GroupwiseIntLinear)}
    assert len(ours) == 14
    for name, layer in ours.items():
        assert torch.equal(layer.codes(), expected.get_submodule(name).codes()), name
        assert torch.equal(layer.dequantize(), expected.get_submodule(name).dequantize()), name
    batch = fixed_token_batch(loaded.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, expected(**batch).logits)


def test_v1_all_ones_zero_field_reads_as_two_to_the_bits(wide_model_dir, tmp_path):
    write_gptq_folder(wide_model_dir, tmp_path / "gptq", 4, 32, sym=False, checkpoint_format="gptq")
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "gptq" / "model.safetensors"))
    name = "model.layers.0.mlp.up_proj"
    tensors[f"{name}.qzeros"][0, 0] = -1  # eight all-ones fields: the runtimes' z = 15 + 1 = 16
    save_file(tensors, str(tmp_path / "gptq" / "model.safetensors"))
    layer = GroupwiseInt(bits=4, group_size=32).load(str(tmp_path / "gptq")).get_submodule(name)
    torch.testing.assert_close(layer.offsets[:8, 0], -16 * layer.scales[:8, 0].float(), rtol=0, atol=0)


def test_act_order_and_other_widths_are_refused_by_name(wide_model_dir, tmp_path):
    write_gptq_folder(wide_model_dir, tmp_path / "gptq", 4, 32, sym=True, checkpoint_format="gptq_v2")
    with pytest.raises(ValueError, match=r"bits=4, group_size=32; set model.quantization's bits"):
        GroupwiseInt(bits=3, group_size=32).load(str(tmp_path / "gptq"))
    config = json.loads((tmp_path / "gptq" / "config.json").read_text())
    config["quantization_config"]["desc_act"] = True
    (tmp_path / "gptq" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="act-order"):
        GroupwiseInt(bits=4, group_size=32).load(str(tmp_path / "gptq"))
