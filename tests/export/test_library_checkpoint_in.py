"""A folder written by llm-compressor itself (tests/assets/llmcompressor_w4a16_asym_g32: GPTQ INT4 g32,
asymmetric) trains as a QA-BLoRA base and exports back exactly (issue 33)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qblora_pl.adapters import QABLoRA
from qblora_pl.adapters.injection import adapted_layers
from qblora_pl.export.compressed_tensors_writer import CT_WEIGHTS_FILE, load_compressed_tensors
from qblora_pl.export.exporter import CT_DIR, export_module
from qblora_pl.export.verify import fixed_token_batch
from qblora_pl.module import QuantizedCausalLM
from qblora_pl.qat import MergedOffsetFakeQuant
from qblora_pl.quantization import GroupwiseInt
from qblora_pl.quantization.int_layer import GroupwiseIntLinear

pytest.importorskip("compressed_tensors")
LIBRARY_FOLDER = Path(__file__).resolve().parents[1] / "assets" / "llmcompressor_w4a16_asym_g32"
LAYER_TENSORS = ("weight_packed", "weight_zero_point", "weight_scale", "weight_shape")


def _module():
    module = QuantizedCausalLM(str(LIBRARY_FOLDER), quantization=GroupwiseInt(bits=4, group_size=32),
                               adapter=QABLoRA(budget_rank=4, dropout=0.0))
    module.configure_model()
    return module


def test_the_library_folder_is_the_base_to_float32_rounding():
    """Codes, scales and zero points are the library's exactly; ``scale * q + offset`` and the library's
    ``scale * (q - z)`` round differently with its float32 scales, by at most an ulp of the weight."""
    base = GroupwiseInt(bits=4, group_size=32).load(str(LIBRARY_FOLDER))
    reference = load_compressed_tensors(LIBRARY_FOLDER)  # compressed-tensors' own decompression
    layers = {n: m for n, m in base.named_modules() if isinstance(m, GroupwiseIntLinear)}
    assert len(layers) == 14
    for name, layer in layers.items():
        theirs = reference.get_submodule(name).weight.detach()
        ulp = torch.finfo(torch.float32).eps * theirs.abs().max()
        assert (layer.dequantize() - theirs).abs().max() <= ulp, name
    assert 0 < base.quantization_source["max_abs_diff_vs_transformers"] < 1e-7
    batch = fixed_token_batch(base.config.vocab_size)
    with torch.no_grad():
        ours, theirs = base(**batch).logits, reference(**batch).logits
    assert (ours - theirs)[batch["attention_mask"].bool()].abs().max() < 1e-5


def test_untrained_adapters_export_back_to_the_library_bytes(tmp_path):
    export_module(_module(), tmp_path / "out", formats=["compressed-tensors"], verify=False, log=lambda _: None)
    theirs = load_file(str(LIBRARY_FOLDER / "model.safetensors"))
    ours = load_file(str(tmp_path / "out" / CT_DIR / CT_WEIGHTS_FILE))
    names = sorted(k[: -len(".weight_packed")] for k in theirs if k.endswith(".weight_packed"))
    assert len(names) == 14
    for name in names:
        for part in LAYER_TENSORS:
            assert torch.equal(ours[f"{name}.{part}"], theirs[f"{name}.{part}"]), f"{name}.{part}"


def test_it_trains_as_a_qablora_base_and_exports_the_trained_model_exactly(tmp_path):
    module = _module()
    model = module.model.train()
    ids = torch.randint(3, 400, (4, 24), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for layer in adapted_layers(model).values():  # QATSchedule(zero_point: integer) at full strength
        layer.fake_quant = MergedOffsetFakeQuant(zero_point="integer", strength=1.0)
    losses = []
    for _ in range(5):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    batch = fixed_token_batch(model.config.vocab_size)
    model.eval()
    with torch.no_grad():
        trained = model(**batch).logits
    report = export_module(module, tmp_path / "out", formats=["compressed-tensors"], batch=batch, log=lambda _: None)
    assert report["formats"]["compressed-tensors"]["rounding_reason"] == "trained with QATSchedule zero_point: integer"
    served = load_compressed_tensors(tmp_path / "out" / CT_DIR)
    with torch.no_grad():
        logits = served(**batch).logits
    mask = batch["attention_mask"].bool()
    assert (logits - trained)[mask].abs().max() < 1e-5
    # the adapters moved zero points, not codes or scales
    theirs = load_file(str(LIBRARY_FOLDER / "model.safetensors"))
    ours = load_file(str(tmp_path / "out" / CT_DIR / CT_WEIGHTS_FILE))
    name = "model.layers.0.mlp.down_proj"
    assert torch.equal(ours[f"{name}.weight_packed"], theirs[f"{name}.weight_packed"])
    assert not torch.equal(ours[f"{name}.weight_zero_point"], theirs[f"{name}.weight_zero_point"])
