"""Group-wise asymmetric INT-b base (docs/method.md section 3): quantizer, frozen layer, model swap."""

import copy

import pytest
import torch
from torch import nn

from qblora_pl.quantization.int_layer import GroupwiseIntLinear, dequantized_weight_cache, quantize_linear_layers
from qblora_pl.quantization.int_quantizer import SUPPORTED_GROUP_SIZES, GroupwiseIntQuantizer
from qblora_pl.quantization.packing import SUPPORTED_BITS, unpack_codes

LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- quantizer
def test_quantize_hand_computed_two_bit_groups():
    # Row 0, group 0: min -1, max 2 -> scale (2 - (-1)) / 3 = 1, offset -1,
    # q = round(w + 1). Row 0, group 1: constant 0.7 -> codes 0, offset 0.7, exact.
    # Row 1, group 0: min 0, max 0.3 -> scale 0.1, offset 0. Row 1, group 1: min -4, max 2
    # -> scale 2, offset -4.
    w = torch.zeros(2, 64)
    w[0, :8] = torch.tensor([-1.0, 2.0, 0.4, 0.6, 1.49, 1.51, -0.6, 0.0])
    w[0, 32:] = 0.7
    w[1, :4] = torch.tensor([0.0, 0.3, 0.14, 0.26])
    w[1, 32:36] = torch.tensor([-4.0, 2.0, -2.9, 0.9])
    codes, scales, offsets = GroupwiseIntQuantizer(bits=2, group_size=32).quantize(w)

    assert codes.dtype == torch.uint8 and codes.shape == (2, 64)
    assert scales.dtype == offsets.dtype == torch.float32 and scales.shape == (2, 2)
    torch.testing.assert_close(offsets, torch.tensor([[-1.0, 0.7], [0.0, -4.0]]))
    torch.testing.assert_close(scales[:, 0], torch.tensor([1.0, 0.1]))
    assert scales[1, 1].item() == 2.0
    assert 0 < scales[0, 1].item() < 1e-30  # constant group: a tiny positive scale
    assert codes[0, :8].tolist() == [0, 3, 1, 2, 2, 3, 0, 1]
    assert codes[0, 8:32].eq(1).all() and codes[0, 32:].eq(0).all()
    assert codes[1, :4].tolist() == [0, 3, 1, 3]  # 1.4 -> 1, 2.6 -> 3
    assert codes[1, 4:32].eq(0).all()
    assert codes[1, 32:36].tolist() == [0, 3, 1, 2]  # 0.55 -> 1, 2.45 -> 2
    assert codes[1, 36:].eq(2).all()  # 0 - (-4) = 4 -> 2

    w_hat = GroupwiseIntQuantizer(2, 32).dequantize(codes, scales, offsets)
    assert torch.equal(w_hat[0, 32:], torch.full((32,), 0.7))  # constant group is exact
    assert w_hat[0, :8].tolist() == [-1.0, 2.0, 0.0, 1.0, 1.0, 2.0, -1.0, 0.0]


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("group_size", SUPPORTED_GROUP_SIZES)
def test_round_to_nearest_error_is_at_most_half_a_step(bits, group_size):
    q = GroupwiseIntQuantizer(bits, group_size)
    w = _randn(6, 256, seed=bits * group_size)
    codes, scales, offsets = q.quantize(w)
    assert int(codes.max()) <= 2**bits - 1
    err = (q.dequantize(codes, scales, offsets) - w).abs()
    half_step = (scales / 2).repeat_interleave(group_size, dim=1)
    assert (err <= half_step * (1 + 1e-5) + 1e-7).all()
    # Every group's extremes are representable: min -> code 0, max -> top code.
    groups = codes.reshape(6, -1, group_size)
    assert groups.amin(-1).eq(0).all() and groups.amax(-1).eq(2**bits - 1).all()


def test_param_dtype_rounds_scales_before_choosing_codes():
    q = GroupwiseIntQuantizer(4, 32)
    w = _randn(4, 64, seed=3)
    codes, scales, offsets = q.quantize(w, param_dtype=torch.float16)
    assert torch.equal(scales, scales.half().float())
    assert torch.equal(offsets, offsets.half().float())
    err = (q.dequantize(codes, scales.half(), offsets.half()) - w).abs()
    half_step = (scales / 2).repeat_interleave(32, dim=1)
    assert (err <= half_step + 2e-3).all()  # + fp16 rounding of the offset at clamped ends


def test_quantize_rejects_bad_shapes_and_values():
    q = GroupwiseIntQuantizer(4, 64)
    with pytest.raises(ValueError, match=r"d_in=96 is not divisible by group_size=64"):
        q.quantize(torch.zeros(3, 96))
    with pytest.raises(ValueError, match="non-finite"):
        q.quantize(torch.tensor([[float("nan")] + [0.0] * 63]))
    with pytest.raises(ValueError, match=r"2-D"):
        q.quantize(torch.zeros(64))
    with pytest.raises(ValueError, match=r"offsets have shape \(3, 1\), expected \(3, 2\)"):
        q.dequantize(torch.zeros(3, 128, dtype=torch.uint8), torch.ones(3, 2), torch.ones(3, 1))


def test_bits_and_group_size_validation_messages():
    with pytest.raises(ValueError, match=r"bits=5 .*allowed: \(2, 3, 4, 8\)"):
        GroupwiseIntQuantizer(bits=5)
    with pytest.raises(ValueError, match=r"group_size=16 .*allowed: \(32, 64, 128\)"):
        GroupwiseIntQuantizer(group_size=16)


def test_fake_quantize_forward_is_dequantize_and_gradient_is_identity():
    q = GroupwiseIntQuantizer(3, 32)
    w = _randn(5, 64, seed=7).requires_grad_()
    out = q.fake_quantize(w)
    assert torch.equal(out, q.dequantize(*q.quantize(w.detach())))
    upstream = _randn(5, 64, seed=8)
    out.backward(upstream)
    assert torch.equal(w.grad, upstream)


def test_gptq_beats_round_to_nearest_on_correlated_inputs():
    q = GroupwiseIntQuantizer(3, 32)
    w = _randn(48, 128, seed=11) * 0.1
    x = _randn(256, 128, seed=12) @ _randn(128, 128, seed=13)  # strongly correlated inputs
    rtn = q.dequantize(*q.quantize(w))
    codes, scales, offsets = q.quantize_gptq(w, [x[:128], x[128:]])
    assert codes.shape == w.shape and scales.shape == offsets.shape == (48, 4)
    gptq = q.dequantize(codes, scales, offsets)

    def output_error(w_hat):
        return ((x @ (w_hat - w).T) ** 2).mean()

    assert output_error(gptq) < 0.8 * output_error(rtn)
    with pytest.raises(ValueError, match=r"last dimension 64, expected d_in=128"):
        q.quantize_gptq(w, torch.zeros(4, 64))


# --------------------------------------------------------------------------- layer
def _layer(bits=4, group_size=32, bias=True, d_in=64, d_out=24, seed=0):
    linear = nn.Linear(d_in, d_out, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(_randn(d_out, d_in, seed=seed))
        if bias:
            linear.bias.copy_(_randn(d_out, seed=seed + 1))
    return linear, GroupwiseIntLinear.from_linear(linear, bits, group_size)


def test_from_linear_stores_packed_frozen_parameters_and_nothing_trains():
    linear, layer = _layer(bits=3, group_size=32)
    assert (layer.in_features, layer.out_features, layer.bits, layer.group_size) == (64, 24, 3, 32)
    assert layer.quantizer == GroupwiseIntQuantizer(3, 32)
    assert layer.packed_codes.dtype == torch.uint8 and layer.packed_codes.shape == (24, 64 * 3 // 8)
    assert layer.scales.dtype == layer.offsets.dtype == torch.float16
    assert layer.scales.shape == layer.offsets.shape == (24, 2)
    assert torch.equal(layer.bias, linear.bias.detach())
    # Frozen parameters, not buffers, so FSDP2 shards them (docs/fsdp.md); nothing trains.
    assert [n for n, _ in layer.named_parameters()] == ["packed_codes", "scales", "offsets", "bias"]
    assert list(layer.buffers()) == [] and not hasattr(layer, "weight")
    assert all(not t.requires_grad for t in layer.parameters())
    assert layer.weight_shape == (24, 64)
    assert "in_features=64, out_features=24, bits=3, group_size=32" in repr(layer)
    # Same codes and parameters as the quantizer gives with fp16-rounded parameters.
    codes, scales, offsets = layer.quantizer.quantize(linear.weight, param_dtype=torch.float16)
    assert torch.equal(layer.codes(), codes) and torch.equal(layer.scales.float(), scales)
    assert torch.equal(unpack_codes(layer.packed_codes, 3, 64), codes)
    assert torch.equal(layer.dequantize(), layer.quantizer.dequantize(codes, scales, offsets))


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_forward_and_input_gradient_match_a_plain_linear_with_the_dequantized_weight(bits):
    _, layer = _layer(bits=bits)
    w_hat = layer.dequantize()
    assert w_hat.dtype == torch.float32 and layer.dequantize(torch.bfloat16).dtype == torch.bfloat16
    x = _randn(3, 5, 64, seed=5).requires_grad_()
    y = layer(x)
    torch.testing.assert_close(y, x @ w_hat.T + layer.bias, rtol=0, atol=1e-5)

    plain = nn.Linear(64, 24)
    with torch.no_grad():
        plain.weight.copy_(w_hat)
        plain.bias.copy_(layer.bias)
    x2 = x.detach().clone().requires_grad_()
    upstream = _randn(3, 5, 24, seed=6)
    y.backward(upstream)
    plain(x2).backward(upstream)
    torch.testing.assert_close(x.grad, x2.grad, rtol=0, atol=1e-6)


def test_forward_follows_input_dtype():
    _, layer = _layer()
    y = layer(_randn(2, 64).bfloat16())
    assert y.dtype == torch.bfloat16


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("group_size", SUPPORTED_GROUP_SIZES)
def test_memory_per_weight_matches_the_format(bits, group_size):
    layer = GroupwiseIntLinear(256, 768, bits=bits, group_size=group_size)
    expected = (bits + 2 * 16 / group_size) / 8 * 768 * 256
    assert abs(layer.memory_bytes() - expected) <= 0.02 * expected
    with_bias = GroupwiseIntLinear(256, 768, bits=bits, group_size=group_size, bias=True)
    assert with_bias.memory_bytes() == layer.memory_bytes() + 768 * 4


def test_state_dict_round_trip_into_an_empty_layer_is_bit_exact():
    _, layer = _layer(bits=3, group_size=64, d_in=128)
    empty = GroupwiseIntLinear(128, 24, bits=3, group_size=64, bias=True, scale_dtype=torch.float16)
    assert set(empty.state_dict()) == {"packed_codes", "scales", "offsets", "bias"}
    empty.load_state_dict(layer.state_dict(), strict=True)
    for name, tensor in layer.state_dict().items():
        assert torch.equal(empty.state_dict()[name], tensor), name
    assert torch.equal(empty.dequantize(), layer.dequantize())
    no_bias = GroupwiseIntLinear(64, 8, bias=False)
    assert "bias" not in no_bias.state_dict()


def test_replacing_offsets_with_float32_shifts_weight_by_the_broadcast_delta():
    # What a QA-LoRA / QA-BLoRA merge does (docs/method.md sections 3-4).
    _, layer = _layer(bits=4, group_size=32)
    w_before = layer.dequantize()
    original = layer.offsets
    delta = _randn(24, 2, seed=9) * 0.01
    layer.offsets = original.float() + delta
    assert layer.offsets.dtype == torch.float32 and "offsets" in dict(layer.named_parameters())
    assert not layer.offsets.requires_grad
    w_after = layer.dequantize()
    by_hand = layer.codes().float() * layer.scales.float().repeat_interleave(32, 1) + (
        original.float() + delta
    ).repeat_interleave(32, 1)
    assert torch.equal(w_after, by_hand)
    shift = delta.repeat_interleave(32, 1)
    torch.testing.assert_close(w_after - w_before, shift, rtol=0, atol=1e-6)
    layer.offsets = original
    assert torch.equal(layer.dequantize(), w_before)


def test_dequantized_weight_cache_is_exact_and_follows_every_change_of_the_weight():
    import torch.nn.functional as F

    _, layer = _layer(bits=3, group_size=32)
    model = nn.Sequential(layer)
    x = _randn(5, 64, seed=3)
    uncached = lambda inputs: F.linear(inputs, layer.dequantize(inputs.dtype), layer.bias.to(inputs.dtype))  # noqa: E731
    with torch.no_grad():
        plain = layer(x)
    with dequantized_weight_cache(model):
        with torch.no_grad():
            assert torch.equal(layer(x), plain)
            cached = layer._dense_cache[1]
            assert torch.equal(layer(x), plain) and layer._dense_cache[1] is cached  # reused, not recomputed
            layer.offsets.add_(0.5)  # in place (a merge into the same tensor)
            assert torch.equal(layer(x), uncached(x)) and not torch.equal(layer(x), plain)
            layer.offsets = layer.offsets.float() - 0.25  # by assignment (a QA-* merge)
            assert torch.equal(layer(x), uncached(x))
            layer.scales.mul_(2)
            assert torch.equal(layer(x), uncached(x))
            assert torch.equal(layer(x.double()), uncached(x.double()))  # one cached weight per dtype
        inputs = x.clone().requires_grad_()  # autograd through the cached weight: d(sum)/dx = column sums of W_hat
        layer(inputs).sum().backward()
        assert torch.equal(inputs.grad, layer.dequantize().sum(0).expand(5, -1))
    assert layer._dense_cache is None and not layer._cache_dense  # dropped on exit, setting restored


def test_module_dtype_cast_keeps_quantization_buffers():
    _, layer = _layer()
    w_before = layer.dequantize()
    layer.to(torch.bfloat16)
    assert layer.scales.dtype == layer.offsets.dtype == torch.float16
    assert layer.bias.dtype == torch.float32 and layer.packed_codes.dtype == torch.uint8
    assert torch.equal(layer.dequantize(), w_before)


def test_constructor_validates_shapes():
    with pytest.raises(ValueError, match=r"d_in=100 is not divisible by group_size=32"):
        GroupwiseIntLinear(100, 8)
    with pytest.raises(ValueError, match=r"bits=1 "):
        GroupwiseIntLinear(64, 8, bits=1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_layer_matches_cpu():
    linear, layer = _layer(bits=3)
    gpu = GroupwiseIntLinear.from_linear(linear.cuda(), bits=3, group_size=32)
    assert gpu.packed_codes.is_cuda
    assert torch.equal(gpu.packed_codes.cpu(), layer.packed_codes)
    torch.testing.assert_close(gpu.dequantize().cpu(), layer.dequantize(), rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- model swap
def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def test_quantize_linear_layers_on_tiny_llama():
    model = _tiny_llama()
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(ids).logits

    def quantized_logits(bits):
        quantized = copy.deepcopy(model)
        names = quantize_linear_layers(quantized, LLAMA_PROJECTIONS, bits, 32, torch.float16)
        assert len(names) == 2 * 7
        assert {n.rsplit(".", 1)[-1] for n in names} == set(LLAMA_PROJECTIONS)
        for name in names:
            module = quantized.get_submodule(name)
            assert isinstance(module, GroupwiseIntLinear) and module.bits == bits
        assert isinstance(quantized.lm_head, nn.Linear)
        with torch.no_grad():
            return quantized(ids).logits

    assert (quantized_logits(8) - reference).abs().max() < 0.03
    assert (quantized_logits(2) - reference).abs().max() > 0.1


def test_quantize_linear_layers_predicate_and_errors():
    model = nn.Sequential()
    model.add_module("up", nn.Linear(64, 32))
    model.add_module("odd", nn.Linear(48, 32))
    assert quantize_linear_layers(model, lambda name: name == "up", 4, 32) == ["up"]
    assert isinstance(model.up, GroupwiseIntLinear) and isinstance(model.odd, nn.Linear)

    with pytest.raises(ValueError, match=r"available linear layer names: \['odd'\]"):
        quantize_linear_layers(model, ["q_proj"], 4, 32)
    with pytest.raises(ValueError, match=r"layer odd: d_in=48 is not divisible by group_size=32"):
        quantize_linear_layers(model, ["odd"], 4, 32)
    assert isinstance(model.odd, nn.Linear)
