"""Adapter strategies: parameter counts, forward == dense update, rank, merges, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qblora_pl.adapters import AdaptedLinear, AdapterConfigError, LoRA, QABLoRA, QALoRA, QBLoRA
from qblora_pl.adapters.budget import choose_k_out, lora_parameter_count
from qblora_pl.quantization.base_layers import dequantized_weight
from qblora_pl.quantization.int_layer import GroupwiseIntLinear

D_IN, D_OUT = 256, 128


def _int_base(d_in=D_IN, d_out=D_OUT, bits=4, group_size=32, seed=0) -> GroupwiseIntLinear:
    torch.manual_seed(seed)
    return GroupwiseIntLinear.from_linear(nn.Linear(d_in, d_out), bits=bits, group_size=group_size)


def _dense_base(d_in=D_IN, d_out=D_OUT, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(d_in, d_out).requires_grad_(False)


def _randomize(layer: AdaptedLinear, seed: int = 1) -> AdaptedLinear:
    """Non-zero adapters: a zero update would let merge tests pass on an untrained adapter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return layer


STRATEGIES = {
    "lora": (LoRA(r=4, alpha=8, dropout=0.0), _dense_base),
    "qblora": (QBLoRA(r=4, alpha=8, dropout=0.0), _dense_base),
    "qalora": (QALoRA(r=4, alpha=8, dropout=0.0), _int_base),
    "qablora": (QABLoRA(budget_rank=4, alpha=8, dropout=0.0), _int_base),
}


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_forward_equals_dense_update(name):
    strategy, make_base = STRATEGIES[name]
    layer = _randomize(strategy.wrap("layer", make_base()))
    x = torch.randn(3, 5, D_IN)
    w = dequantized_weight(layer.base_layer, torch.float32) + layer.adapter.delta_weight()
    expected = x @ w.T + layer.base_bias
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_qblora_parameter_count_equals_lora_at_same_budget():
    lora = LoRA(r=8).wrap("l", _dense_base())
    qblora = QBLoRA(r=8, k_in=2, k_out=2, rank_multiplier=2).wrap("l", _dense_base())
    n_lora = sum(p.numel() for p in lora.adapter.parameters())
    n_qblora = sum(p.numel() for p in qblora.adapter.parameters())
    assert n_lora == lora_parameter_count(D_IN, D_OUT, 8) == n_qblora


def test_qblora_update_reaches_m_times_rank():
    lora = _randomize(LoRA(r=4).wrap("l", _dense_base()))
    qblora = _randomize(QBLoRA(r=4, rank_multiplier=2).wrap("l", _dense_base()))
    assert torch.linalg.matrix_rank(lora.adapter.delta_weight()).item() == 4
    assert torch.linalg.matrix_rank(qblora.adapter.delta_weight()).item() == 8


def test_qblora_dense_update_hand_computed():
    """d_in = d_out = 4, k_in = k_out = 2, inner rank 1, s = alpha / r = 1."""
    layer = QBLoRA(r=1, alpha=1, k_in=2, k_out=2, rank_multiplier=1, dropout=0.0).wrap("l", _dense_base(4, 4))
    with torch.no_grad():
        layer.adapter.lora_A.copy_(torch.tensor([[1.0, 2.0]]))
        layer.adapter.lora_B.copy_(torch.tensor([[3.0], [4.0]]))
    # B A = [[3, 6], [4, 8]]; pooling averages pairs (/2); each value covers a 2x2 tile.
    expected = torch.tensor(
        [[1.5, 1.5, 3.0, 3.0], [1.5, 1.5, 3.0, 3.0], [2.0, 2.0, 4.0, 4.0], [2.0, 2.0, 4.0, 4.0]]
    )
    torch.testing.assert_close(layer.adapter.delta_weight(), expected)
    x = torch.tensor([[1.0, 3.0, 0.0, 2.0]])
    # pooled x = [2, 1]; A -> 2*1 + 1*2 = 4; B -> [12, 16]; repeated -> [12, 12, 16, 16]
    torch.testing.assert_close(layer.adapter(x), torch.tensor([[12.0, 12.0, 16.0, 16.0]]))


def test_qablora_offset_fold_hand_computed():
    """One group of 32 inputs, two outputs, k_out = 1: offset' = offset + s * M / 32."""
    base = _int_base(d_in=32, d_out=2)
    layer = QABLoRA(budget_rank=1, alpha=2, k_out=1, dropout=0.0).wrap("l", base)
    with torch.no_grad():
        layer.adapter.balanced_M.copy_(torch.tensor([[16.0], [-32.0]]))
    original = base.offsets.float().clone()
    layer.merge()
    # s = 2 / 1 = 2: deltas are 2 * 16 / 32 = 1 and 2 * -32 / 32 = -2.
    torch.testing.assert_close(base.offsets, original + torch.tensor([[1.0], [-2.0]]))


def test_qablora_starts_at_zero_update():
    layer = QABLoRA().wrap("l", _int_base())
    x = torch.randn(2, D_IN)
    torch.testing.assert_close(layer(x), layer.base_layer(x))


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_merge_matches_unmerged_output_and_is_idempotent(name):
    strategy, make_base = STRATEGIES[name]
    layer = _randomize(strategy.wrap("layer", make_base()))
    x = torch.randn(4, D_IN)
    base_out = layer.base_layer(x)
    before = layer(x)
    assert (before - base_out).abs().max() > 1e-3, "adapter must change the output"
    layer.merge()
    merged = layer(x)
    torch.testing.assert_close(merged, before, atol=1e-5, rtol=1e-5)
    layer.merge()  # idempotent
    torch.testing.assert_close(layer(x), merged, atol=0, rtol=0)
    layer.unmerge()
    layer.unmerge()
    torch.testing.assert_close(layer(x), before, atol=0, rtol=0)
    torch.testing.assert_close(layer.base_layer(x), base_out, atol=0, rtol=0)


@pytest.mark.parametrize("name", ["qalora", "qablora"])
def test_qa_merge_keeps_base_low_bit(name):
    strategy, make_base = STRATEGIES[name]
    layer = _randomize(strategy.wrap("layer", make_base()))
    base = layer.base_layer
    codes = base.packed_codes.clone()
    layer.merge()
    assert layer.base_layer is base, "QA-* merges in place into the INT-b base"
    assert torch.equal(base.packed_codes, codes)
    assert isinstance(layer.base_layer, GroupwiseIntLinear)


def test_lora_merge_on_int_base_gives_dense_copy_and_restores():
    layer = _randomize(LoRA(r=4, dropout=0.0).wrap("l", _int_base()))
    base = layer.base_layer
    layer.merge()
    assert isinstance(layer.base_layer, nn.Linear)
    assert "base_layer.packed_codes" not in layer.state_dict()
    layer.unmerge()
    assert layer.base_layer is base


def test_merge_aborts_on_non_finite_update():
    layer = QALoRA(r=2, dropout=0.0).wrap("model.layers.0.q_proj", _int_base())
    with torch.no_grad():
        layer.adapter.lora_B.fill_(float("inf"))
    with pytest.raises(FloatingPointError, match="model.layers.0.q_proj"):
        layer.merge(name="model.layers.0.q_proj")
    assert not layer.merged


def test_budget_helper_matches_lora_budget_on_7b_shapes():
    assert choose_k_out(4096, 4096, 32, 64) == 1
    assert choose_k_out(4096, 4096, 32, 16) == 4  # 1024 x 128 = LoRA r=16's 131,072
    assert choose_k_out(4096, 4096, 64, 64) == 1
    k = choose_k_out(4096, 11008, 32, 64)
    assert 11008 % k == 0 and (11008 // k) * 128 <= lora_parameter_count(4096, 11008, 64)


@pytest.mark.parametrize(
    "strategy, base, message",
    [
        (QBLoRA(k_in=3), lambda: _dense_base(256, 128), "d_in=256 is not divisible by k_in=3"),
        (QBLoRA(k_out=3), lambda: _dense_base(256, 128), "d_out=128 is not divisible by k_out=3"),
        (QALoRA(pool_window=48), lambda: _int_base(), "pool_window=48 is not a multiple of the base's group_size=32"),
        (QABLoRA(k_out=3), lambda: _int_base(), "d_out=128 is not divisible by k_out=3"),
        (QALoRA(), lambda: _dense_base(), "has none"),
        (QABLoRA(pool_window=96), lambda: _int_base(), "d_in=256 is not divisible by pool_window=96"),
    ],
)
def test_invalid_combinations_name_layer_and_numbers(strategy, base, message):
    with pytest.raises(AdapterConfigError, match="layer model.layers.3.mlp.down_proj") as info:
        strategy.wrap("model.layers.3.mlp.down_proj", base())
    assert message in str(info.value)


def test_qa_strategy_rejects_nf4_base():
    bnb = pytest.importorskip("bitsandbytes")
    base = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    base.load_state_dict({"weight": torch.randn(64, 64)}, strict=False)
    with pytest.raises(AdapterConfigError, match="bnb NF4.*GroupwiseInt"):
        QABLoRA().wrap("q_proj", base)


@pytest.mark.parametrize("kwargs", [dict(r=0), dict(dropout=1.5)])
def test_bad_hyperparameters(kwargs):
    with pytest.raises(AdapterConfigError):
        LoRA(**kwargs)


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_factored_singular_values_equal_dense_svd(name):
    strategy, make_base = STRATEGIES[name]
    layer = _randomize(strategy.wrap("layer", make_base()))
    factored = layer.adapter.update_singular_values()
    dense = torch.linalg.svdvals(layer.adapter.delta_weight())
    n = min(len(factored), len(dense))
    torch.testing.assert_close(factored[:n], dense[:n], atol=1e-5, rtol=1e-4)
    assert float(dense[n:].abs().sum()) < 1e-4  # the rest of the dense spectrum is zero


@pytest.mark.parametrize("name", ["qalora", "qablora"])
def test_training_weight_equals_merged_int_weight(name):
    """One code path: what training computes (W_hat + dW) is what the merged INT-b layer holds."""
    strategy, make_base = STRATEGIES[name]
    layer = _randomize(strategy.wrap("layer", make_base()))
    training_weight = dequantized_weight(layer.base_layer, torch.float32) + layer.adapter.delta_weight()
    layer.merge()
    torch.testing.assert_close(layer.base_layer.dequantize(torch.float32), training_weight, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["qblora", "qablora"])
def test_broadcast_add_equals_materialised_repeat(name):
    strategy, make_base = STRATEGIES[name]
    layer = _randomize(strategy.wrap("layer", make_base()))
    x, result = torch.randn(2, 3, D_IN), torch.randn(2, 3, D_OUT)
    torch.testing.assert_close(layer.adapter.add_delta(result, x), result + layer.adapter(x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 32])
def test_pooling_and_repeat_gradients_match_reference_ops(k):
    from qblora_pl.adapters.base import add_repeated, mean_pool

    x = torch.randn(1, 2, 96 if k != 32 else 64, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda t: mean_pool(t, k), (x,))
    reference = x.unflatten(-1, (x.shape[-1] // k, k)).mean(-1)
    torch.testing.assert_close(mean_pool(x, k), reference)
    low = torch.randn(1, 2, 12, dtype=torch.float64, requires_grad=True)
    result = torch.randn(1, 2, 12 * k, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda r, l: add_repeated(r, l, k), (result, low))
    torch.testing.assert_close(add_repeated(result, low, k), result + low.repeat_interleave(k, -1))
