"""Learned group scales (``scale_rank``): QA-LoRA / QA-BLoRA also train ``s' = s * (1 + B_s A_s)``.

Checked against hand-computed numbers and plain autograd, for exact merges (the merged scales are
the trained ones, so every low-bit export holds the trained model), and through the native, GGUF
and MLX exports to 1e-5 in the logits.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qblora_pl.adapters import AdapterConfigError, QABLoRA, QALoRA
from qblora_pl.adapters.budget import choose_k_out, lora_parameter_count, scale_update_parameter_count
from qblora_pl.quantization.dequant_linear import DEQUANT_BLOCK_BYTES
from qblora_pl.quantization.int_layer import GroupwiseIntLinear

D_IN, D_OUT, GROUP = 256, 128, 32


def _layer(strategy, seed=0, scale_dtype=torch.float16):
    torch.manual_seed(seed)
    base = GroupwiseIntLinear.from_linear(nn.Linear(D_IN, D_OUT), bits=4, group_size=GROUP, scale_dtype=scale_dtype)
    layer = strategy.wrap("layer", base)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in layer.adapter.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.2 if name.startswith("scale_") else 0.05))
    return layer


@pytest.mark.parametrize("strategy", [QALoRA(r=4, dropout=0.0, scale_rank=2), QABLoRA(budget_rank=4, dropout=0.0, scale_rank=2)])
def test_parameters_and_the_hand_computed_update(strategy):
    layer = _layer(strategy)
    adapter, base = layer.adapter, layer.base_layer
    n_groups = D_IN // GROUP
    assert adapter.scale_B.shape == (D_OUT, 2) and adapter.scale_A.shape == (2, n_groups)
    expected = base.scales.float() * (1 + adapter.scale_B @ adapter.scale_A)  # s' = s * (1 + B_s A_s)
    trained = layer.trained_scales()
    assert torch.equal(trained, expected.half().float())  # rounded to the stored float16
    assert float((trained - expected).detach().abs().max()) > 0  # ... which is a real rounding
    # y = x ((s'[G] * q + m[G]) + dW)^T
    x = torch.randn(3, D_IN)
    weight = base.quantizer.dequantize(base.codes(), trained, base.offsets) + adapter.delta_weight()
    torch.testing.assert_close(layer(x), x @ weight.T + base.bias, rtol=1e-5, atol=1e-5)


def test_scale_rank_zero_is_the_method_without_it():
    with_zero = _layer(QABLoRA(budget_rank=4, dropout=0.0, scale_rank=0))
    assert with_zero.trained_scales() is None and not hasattr(with_zero.adapter, "scale_B")


def test_the_scale_gradient_equals_plain_autograd(monkeypatch):
    """DequantizingLinear's scale gradient (row blocks, codes not saved as W_hat) against autograd's own."""
    monkeypatch.setattr("qblora_pl.quantization.dequant_linear.DEQUANT_BLOCK_BYTES", 4 * D_IN * 40)  # 4 row blocks
    layer = _layer(QALoRA(r=4, dropout=0.0, scale_rank=3), scale_dtype=torch.float32)
    x = torch.randn(2, 5, D_IN)
    grad_out = torch.randn(2, 5, D_OUT)
    (layer(x) * grad_out).sum().backward()
    ours = {n: p.grad.clone() for n, p in layer.adapter.named_parameters()}
    layer.adapter.zero_grad()
    base, adapter = layer.base_layer, layer.adapter
    scales = base.scales.float() * (1 + adapter.scale_B @ adapter.scale_A)
    reference = F.linear(x, base.quantizer.dequantize(base.codes(), scales, base.offsets), base.bias) + adapter(x)
    (reference * grad_out).sum().backward()
    for name, p in adapter.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, rtol=1e-4, atol=1e-5, msg=name)
    assert DEQUANT_BLOCK_BYTES == 16 * 2**20  # the patch above was local


@pytest.mark.parametrize("strategy", [QALoRA(r=4, dropout=0.0, scale_rank=2), QABLoRA(budget_rank=4, dropout=0.0, scale_rank=2)])
def test_merge_folds_into_scales_and_offsets_exactly_and_unmerges(strategy):
    layer = _layer(strategy)
    base = layer.base_layer
    x = torch.randn(4, D_IN)
    before = layer(x)
    scales, offsets, codes = base.scales.clone(), base.offsets.clone(), base.packed_codes.clone()
    trained = layer.trained_scales().detach()
    layer.merge()
    layer.merge()  # idempotent
    assert base.scales.dtype == torch.float16 and torch.equal(base.scales.float(), trained)
    assert torch.equal(base.packed_codes, codes)  # still b-bit: only scales and offsets moved
    torch.testing.assert_close(layer(x), before, rtol=0, atol=1e-5)
    layer.unmerge()
    assert torch.equal(base.scales, scales) and torch.equal(base.offsets, offsets)
    torch.testing.assert_close(layer(x), before, rtol=0, atol=0)


def test_qablora_counts_the_scale_update_in_its_budget():
    n_groups = 4096 // 32
    reserved = scale_update_parameter_count(4096, n_groups, 4)
    assert reserved == 4 * (4096 + n_groups)
    k_free = choose_k_out(4096, 4096, 32, 64)
    k_reserved = choose_k_out(4096, 4096, 32, 64, reserved)
    assert k_free == 1 and k_reserved == 2  # 524,288 + 16,896 > LoRA-64's 524,288: the matrix halves
    layer = QABLoRA(budget_rank=4, dropout=0.0, scale_rank=2).wrap("layer", GroupwiseIntLinear(D_IN, D_OUT, bits=4, group_size=GROUP))
    count = sum(p.numel() for p in layer.adapter.parameters())
    assert count <= lora_parameter_count(D_IN, D_OUT, 4)
    assert count == (D_OUT // layer.adapter.k_out) * (D_IN // GROUP) + 2 * (D_OUT + D_IN // GROUP)


@pytest.mark.parametrize("value", [-1, 1.5, True])
def test_a_bad_scale_rank_is_named(value):
    with pytest.raises(AdapterConfigError, match=rf"QA-BLoRA scale_rank={value!r} must be an integer >= 0"):
        QABLoRA(scale_rank=value)


# ---------------------------------------------------------------- through the exports
@pytest.fixture
def learned_scale_module(tiny_model_dir):
    from qblora_pl.module import QuantizedCausalLM
    from qblora_pl.quantization import GroupwiseInt
    from tests.export.conftest import randomize_adapters

    module = QuantizedCausalLM(str(tiny_model_dir), quantization=GroupwiseInt(bits=4, group_size=32),
                               adapter=QABLoRA(budget_rank=4, dropout=0.0, scale_rank=2))
    module.configure_model()
    randomize_adapters(module, std=0.2)
    return module


def _logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()


def test_native_and_mlx_exports_hold_the_trained_model(learned_scale_module, tmp_path):
    from qblora_pl.export import export_module
    from qblora_pl.export.verify import fixed_token_batch
    from qblora_pl.quantization.native_checkpoint import load_native

    batch = fixed_token_batch(learned_scale_module.model.config.vocab_size)
    trained = _logits(learned_scale_module.model, batch)
    report = export_module(learned_scale_module, tmp_path, formats=["native", "mlx"], verify=False, log=lambda _: None)
    native = _logits(load_native(tmp_path / "native"), batch)
    assert float((native - trained).abs().max()) <= 1e-5
    pytest.importorskip("mlx_lm")
    from qblora_pl.export.mlx_loader import load_mlx

    assert report["formats"]["mlx"]["path"]
    mlx = _logits(load_mlx(tmp_path / "mlx"), batch)
    assert float((mlx - trained).abs().max()) <= 1e-5  # MLX's own CPU kernels (float32 scales and biases)


def test_gguf_export_holds_the_model_trained_with_float16_offsets(learned_scale_module, tmp_path):
    """GGUF Q4_1 stores d and m in float16: trained scales are float16 by construction, and QAT
    (zero_point: float16) trains the merged offsets as stored. Then the file is the trained model
    (embeddings and norms kept in F32 here; the default F16 for them costs ~2e-4 with or without
    learned scales)."""
    from qblora_pl.adapters import AdaptedLinear
    from qblora_pl.export import export_module
    from qblora_pl.export.verify import fixed_token_batch, load_gguf_with_reader
    from qblora_pl.qat import MergedOffsetFakeQuant

    layers = [m for m in learned_scale_module.model.modules() if isinstance(m, AdaptedLinear)]
    for layer in layers:
        layer.fake_quant = MergedOffsetFakeQuant()
        layer.fake_quant.zero_point, layer.fake_quant.strength = "float16", 1.0
    batch = fixed_token_batch(learned_scale_module.model.config.vocab_size)
    trained = _logits(learned_scale_module.model, batch)
    export_module(learned_scale_module, tmp_path, formats=["gguf"], verify=False, gguf_dense_type="f32",
                  log=lambda _: None)
    gguf = _logits(load_gguf_with_reader(tmp_path / "model.gguf"), batch)
    assert float((gguf - trained).abs().max()) <= 1e-5


def test_compressed_tensors_export_holds_the_model_trained_with_integer_zero_points(learned_scale_module, tmp_path):
    """vLLM's layout stores W = scale * (q - z) with an integer z: QAT (zero_point: integer) rounds the merged
    offsets against the trained scales, so the export needs no rounding of its own."""
    pytest.importorskip("compressed_tensors")
    from qblora_pl.adapters import AdaptedLinear
    from qblora_pl.export import export_module
    from qblora_pl.export.compressed_tensors_writer import load_compressed_tensors
    from qblora_pl.export.verify import fixed_token_batch
    from qblora_pl.qat import MergedOffsetFakeQuant

    for layer in (m for m in learned_scale_module.model.modules() if isinstance(m, AdaptedLinear)):
        layer.fake_quant = MergedOffsetFakeQuant()  # zero_point: integer, strength 1
    batch = fixed_token_batch(learned_scale_module.model.config.vocab_size)
    trained = _logits(learned_scale_module.model, batch)
    export_module(learned_scale_module, tmp_path, formats=["compressed-tensors"], verify=False, log=lambda _: None)
    served = _logits(load_compressed_tensors(tmp_path / "compressed-tensors"), batch)
    assert float((served - trained).abs().max()) <= 1e-5
