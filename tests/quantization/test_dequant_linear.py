"""The INT-b base's memory-correct matmul (issue 36): saves the packed codes for backward, not W_hat;
the same forward bit for bit and the same input gradient as the plain autograd path."""

import pytest
import torch
import torch.nn.functional as F

from qblora_pl.adapters import QABLoRA
from qblora_pl.adapters.injection import LLAMA_TARGET_MODULES, inject_adapters
from qblora_pl.quantization import GroupwiseInt
from qblora_pl.quantization import dequant_linear
from qblora_pl.quantization.int_layer import GroupwiseIntLinear


def _layer(out_features=96, in_features=128, bits=3, group_size=32, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_features, in_features, generator=g) * 0.1)
        if bias:
            linear.bias.copy_(torch.randn(out_features, generator=g))
    return GroupwiseIntLinear.from_linear(linear, bits=bits, group_size=group_size)


def _plain(layer, x):
    """The autograd path before issue 36: F.linear on the whole dequantized weight."""
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    weight = layer.quantizer.dequantize(layer.codes(), layer.scales, layer.offsets).to(x.dtype)
    return F.linear(x, weight, bias)


def _saved_shapes(fn):
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, shapes


@pytest.mark.parametrize("block_bytes", [None, 4 * 128 * 10])  # one block; 10-row blocks (10 of 96 rows)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_forward_is_bit_identical_and_input_gradient_matches(monkeypatch, block_bytes, dtype, bits):
    if block_bytes is not None:
        monkeypatch.setattr(dequant_linear, "DEQUANT_BLOCK_BYTES", block_bytes)
        assert dequant_linear.row_block(96, 128) == 10
    layer = _layer(bits=bits)
    x = torch.randn(2, 5, 128, generator=torch.Generator().manual_seed(1)).to(dtype)
    x_ours = x.clone().requires_grad_()
    x_plain = x.clone().requires_grad_()
    y_ours = layer(x_ours)
    y_plain = _plain(layer, x_plain)
    assert y_ours.dtype == dtype and torch.equal(y_ours, y_plain)
    grad = torch.randn(y_ours.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    y_ours.backward(grad)
    y_plain.backward(grad)
    if block_bytes is None:
        assert torch.equal(x_ours.grad, x_plain.grad)  # one block: the same single matmul
    else:  # blocks accumulate in float32: float32 rounding, or the one bf16 rounding of the result
        tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
        torch.testing.assert_close(x_ours.grad, x_plain.grad, **tol)


def test_blocked_dequantize_equals_the_whole_layer_formula(monkeypatch):
    layer = _layer(out_features=50, bits=3)
    whole = layer.quantizer.dequantize(layer.codes(), layer.scales, layer.offsets)
    monkeypatch.setattr(dequant_linear, "DEQUANT_BLOCK_BYTES", 4 * 128 * 7)  # 7-row blocks, last one short
    assert torch.equal(layer.dequantize(), whole)
    assert torch.equal(layer.dequantize(torch.bfloat16), whole.to(torch.bfloat16))


def test_the_layer_saves_its_packed_codes_not_a_weight_shaped_tensor():
    layer = _layer(out_features=96, in_features=128)
    x = torch.randn(3, 128, requires_grad=True)
    _, shapes = _saved_shapes(lambda: layer(x))
    assert (96, 128) not in shapes and (128, 96) not in shapes, shapes
    assert tuple(layer.packed_codes.shape) in shapes  # what backward dequantizes again


def test_no_quantized_layer_weight_shape_is_saved_in_a_qablora_model_step(tiny_model_dir):
    """A whole QA-BLoRA forward on the INT-b base: autograd keeps no tensor of any quantized
    layer's weight shape (before issue 36 it kept every layer's dense W_hat)."""
    model = GroupwiseInt(bits=3, group_size=32).load(str(tiny_model_dir))  # packed (64, 24) etc.: no shape collision
    inject_adapters(model, QABLoRA(budget_rank=8), LLAMA_TARGET_MODULES)
    quantized = {m.weight_shape for m in model.modules() if isinstance(m, GroupwiseIntLinear)}
    assert quantized == {(64, 64), (128, 64), (64, 128)}
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    out, shapes = _saved_shapes(lambda: model(input_ids=ids, labels=ids))
    dense = [s for s in shapes if s in quantized or s[::-1] in quantized]
    assert not dense, f"weight-shaped tensors saved for backward: {dense}"
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", ["offsets", "scales", "bias"])
def test_a_trainable_scale_offset_or_bias_keeps_the_differentiable_plain_path(name):
    layer = _layer()
    getattr(layer, name).requires_grad_(True)
    x = torch.randn(4, 128, requires_grad=True)
    layer(x).sum().backward()
    assert getattr(layer, name).grad is not None and getattr(layer, name).grad.shape == getattr(layer, name).shape
    assert x.grad is not None


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_dequantize_packed_equals_unpack_then_the_formula(bits):
    layer = _layer(out_features=40, in_features=64, bits=bits, bias=False)
    expected = layer.quantizer.dequantize(layer.codes(), layer.scales, layer.offsets)
    got = dequant_linear.dequantize_packed(layer.quantizer, layer.packed_codes, layer.scales, layer.offsets, 64, torch.float32)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("block_bytes", [None, 4 * 128 * 10])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_offset_delta_is_the_merged_offsets_and_gets_their_gradient(monkeypatch, block_bytes, dtype):
    """offset_delta: forward is the layer with offsets + delta (added in float32, as a merge does), bit for bit;
    its gradient, from x's per-group sums, is autograd's through the dense formula (to float32 rounding)."""
    if block_bytes is not None:
        monkeypatch.setattr(dequant_linear, "DEQUANT_BLOCK_BYTES", block_bytes)
    layer = _layer(bits=4)
    g = torch.Generator().manual_seed(3)
    delta = (torch.randn(layer.offsets.shape, generator=g) * 0.01).requires_grad_()
    delta_ref = delta.detach().clone().requires_grad_()
    x = torch.randn(2, 5, 128, generator=g).to(dtype)
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ours = layer(x_ours, offset_delta=delta)
    merged = layer.offsets.float() + delta_ref
    weight = layer.quantizer.dequantize(layer.codes(), layer.scales, merged).to(dtype)
    y_ref = F.linear(x_ref, weight, layer.bias.to(dtype))
    assert torch.equal(y_ours, y_ref)
    grad = torch.randn(y_ours.shape, generator=g).to(dtype)
    y_ours.backward(grad)
    y_ref.backward(grad)
    assert delta.grad.dtype == torch.float32
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(delta.grad, delta_ref.grad, rtol=tol, atol=tol * delta_ref.grad.abs().max().item())
    torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=tol, atol=tol)
    with torch.no_grad():  # no autograd: the same weight
        assert torch.equal(layer(x, offset_delta=delta), y_ref.detach())


def test_an_offset_delta_saves_group_sums_not_x():
    layer = _layer(out_features=96, in_features=128, group_size=32)
    delta = torch.zeros(layer.offsets.shape, requires_grad=True)
    x = torch.randn(7, 128, requires_grad=True)
    _, shapes = _saved_shapes(lambda: layer(x, offset_delta=delta))
    assert (7, 4) in shapes and (7, 128) not in shapes and (96, 128) not in shapes
