"""The opt-in INT4 kernel path of GroupwiseIntLinear, and the exact dequantize path it leaves alone.

The kernel (torch's ``aten._weight_int4pack_mm_for_cpu``) computes in bfloat16, so its outputs
are compared with the exact float32 path within a tolerance: the relative Frobenius error
``||y_kernel - y_exact|| / ||y_exact||`` must stay below ``REL_TOL`` (measured 3e-3 to 4e-3: bf16
activations, scales and zeros, one bf16 output rounding).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from qblora_pl.adapters import QABLoRA
from qblora_pl.quantization import int4_kernel
from qblora_pl.quantization.int4_kernel import Int4KernelFallbackWarning
from qblora_pl.quantization.int_layer import GroupwiseIntLinear, enable_int4_inference
from qblora_pl.quantization.packing import pack_codes

pytestmark = pytest.mark.skipif(
    not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"), reason="torch has no CPU INT4 kernel"
)

REL_TOL = 1e-2


@pytest.fixture(autouse=True)
def _fresh_warnings():
    int4_kernel._INT4_WARNED.clear()  # one warning per reason per process: reset per test
    yield
    int4_kernel._INT4_WARNED.clear()


def _layer(d_in, d_out, group_size=32, bits=4, bias=False, seed=0):
    torch.manual_seed(seed)
    linear = nn.Linear(d_in, d_out, bias=bias)
    return GroupwiseIntLinear.from_linear(linear, bits=bits, group_size=group_size)


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("d_in,d_out", [(128, 16), (256, 96), (384, 48)])
def test_kernel_matches_exact_path_within_tolerance(d_in, d_out, group_size):
    layer = _layer(d_in, d_out, group_size, bias=True, seed=d_in + d_out + group_size)
    x = torch.randn(2, 3, d_in)
    with torch.no_grad():
        exact = layer(x)
        layer.use_int4_kernel(True)
        fast = layer(x)
    assert fast.shape == exact.shape == (2, 3, d_out) and fast.dtype == torch.float32
    assert _rel(fast, exact) < REL_TOL
    assert layer._int4_cache is not None


def test_scale_offset_mapping_is_exact_up_to_the_bf16_output_rounding():
    """With bf16-representable scales, offsets and inputs, the kernel's only error is the final
    bf16 rounding of the output: a wrong mapping (e.g. zero = offset) would be far off."""
    d_in, d_out, g = 64, 32, 32
    layer = GroupwiseIntLinear(d_in, d_out, bits=4, group_size=g)
    gen = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (d_out, d_in), generator=gen, dtype=torch.uint8)
    with torch.no_grad():
        layer.packed_codes.copy_(pack_codes(codes, 4))
        layer.scales.copy_(2.0 ** torch.randint(-6, -1, (d_out, d_in // g), generator=gen))
        layer.offsets.copy_(torch.randint(-8, 8, (d_out, d_in // g), generator=gen) / 16)
    x = torch.randint(-3, 4, (5, d_in), generator=gen).float()
    reference = x.double() @ layer.dequantize().double().T
    with torch.no_grad():
        fast = layer.use_int4_kernel(True)(x)
    assert torch.all((fast.double() - reference).abs() <= reference.abs() * 2.0**-8 + 1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_return_their_dtype(dtype):
    layer = _layer(128, 32, bias=True)
    x = torch.randn(4, 128)
    with torch.inference_mode():
        exact = layer(x)
        fast = layer.use_int4_kernel(True)(x.to(dtype))
    assert fast.dtype == dtype and _rel(fast, exact) < REL_TOL


def test_cache_is_reused_and_invalidated_by_a_qa_merge():
    base = _layer(128, 32, seed=3)
    adapted = QABLoRA(budget_rank=2, alpha=4, dropout=0.0).wrap("layer", base)
    with torch.no_grad():
        for p in adapted.adapter.parameters():
            p.normal_(0, 0.5)
    x = torch.randn(3, 128)
    with torch.no_grad():
        unmerged_exact = adapted(x)
        base_only = base(x)  # what a stale cache (pre-merge offsets) would give after the merge
        base.use_int4_kernel(True)
        before = adapted(x)
        packed = base._int4_cache[1]
        adapted(x)
        assert base._int4_cache[1] is packed  # cached, not rebuilt per call
        adapted.merge()  # replaces base.offsets with offsets + folded update (float32)
        assert base._int4_cache is None
        merged = adapted(x)  # base only now, kernel on the merged offsets
    assert base._int4_cache is not None and base._int4_cache[1] is not packed
    assert _rel(before, unmerged_exact) < REL_TOL
    assert _rel(merged, unmerged_exact) < REL_TOL
    assert _rel(merged, base_only) > 10 * REL_TOL  # the merged offsets are in use, not stale ones
    with torch.no_grad():
        adapted.unmerge()
        assert _rel(adapted(x), unmerged_exact) < REL_TOL


def test_cache_follows_in_place_changes():
    layer = _layer(128, 32, seed=4).use_int4_kernel(True)
    x = torch.randn(2, 128)
    with torch.no_grad():
        first = layer(x)
        layer.offsets.add_(1.0)  # in place: the version counter changes
        second = layer(x)
        layer.use_int4_kernel(False)
        exact = layer(x)
    assert _rel(second, exact) < REL_TOL and _rel(first, exact) > 0.05


def test_grad_path_is_exact_and_warns_once():
    layer = _layer(128, 32, bias=True, seed=5)
    x = torch.randn(3, 128, requires_grad=True)
    exact = layer(x)
    (exact_grad,) = torch.autograd.grad(exact.square().sum(), x)
    layer.use_int4_kernel(True)
    with pytest.warns(Int4KernelFallbackWarning, match="autograd is enabled"):
        out = layer(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out2 = layer(x)  # the same reason does not warn twice
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    assert torch.equal(out, exact) and torch.equal(out2, exact) and torch.equal(grad, exact_grad)
    assert layer._int4_cache is None  # the kernel was never touched


def test_unsupported_input_dtype_falls_back_with_a_named_reason():
    layer = _layer(128, 32, seed=6).use_int4_kernel(True)
    x = torch.randn(2, 128, dtype=torch.float64)
    with torch.no_grad(), pytest.warns(Int4KernelFallbackWarning, match="input dtype torch.float64"):
        out = layer(x)
    with torch.no_grad():
        assert torch.equal(out, layer.use_int4_kernel(False)(x))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(d_in=128, d_out=32, bits=2), "bits=2"),
        (dict(d_in=128, d_out=32, bits=3), "bits=3"),
        (dict(d_in=128, d_out=32, bits=8), "bits=8"),
        (dict(d_in=128, d_out=24), "out_features=24 is not a multiple of 16"),
    ],
)
def test_ineligible_layers_are_refused_with_the_reason(kwargs, match):
    layer = _layer(**kwargs)
    assert match in layer.int4_kernel_unsupported_reason()
    with pytest.raises(ValueError, match=match):
        layer.use_int4_kernel(True)
    assert not layer.int4_kernel_enabled


def test_enable_int4_inference_converts_eligible_layers_and_names_the_rest():
    model = nn.Sequential(_layer(64, 32), _layer(64, 32, bits=2), nn.Linear(32, 8), _layer(64, 48, group_size=64))
    with pytest.warns(Int4KernelFallbackWarning, match=r"1 of 3 .*1: bits=2"):
        switched = enable_int4_inference(model)
    assert switched == ["0", "3"]
    assert model[0].int4_kernel_enabled and model[3].int4_kernel_enabled and not model[1].int4_kernel_enabled
    assert "int4_kernel=True" in repr(model[0])
    keys = set(model.state_dict())
    with torch.no_grad():
        model[0](torch.randn(1, 64))
    assert set(model.state_dict()) == keys  # the cache is not state
    assert enable_int4_inference(model, enabled=False) == ["0", "1", "3"]
    assert not any(isinstance(m, GroupwiseIntLinear) and m.int4_kernel_enabled for m in model)


def test_dequantize_is_bit_identical_to_the_reference_formula():
    """The in-place dequantize and the vectorised unpacking are exact rewrites."""
    for bits in (2, 3, 4, 8):
        layer = _layer(256, 24, group_size=64, bits=bits, seed=bits)
        with torch.no_grad():
            layer.offsets = layer.offsets.float() + 1e-3 * torch.randn(24, 4)  # a merged float32 offset
        q = layer.codes().float().reshape(24, 4, 64)
        reference = (q * layer.scales.float().unsqueeze(-1) + layer.offsets.float().unsqueeze(-1)).reshape(24, 256)
        assert torch.equal(layer.dequantize(), reference)
        x = torch.randn(2, 256)
        assert torch.equal(layer(x), nn.functional.linear(x, reference))
