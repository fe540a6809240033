"""NF4 bases train correctly whatever ran before (issue: silently lost gradients on AVX512-BF16 CPUs).

bitsandbytes' ``Linear4bit`` repacks its weight for a bf16 inference kernel on the first
eval-mode no-grad forward on CPUs with AVX512-BF16, and that kernel has no autograd: later
training forwards drop the gradient through the frozen base. The NF4 backend keeps every 4-bit
layer on the autograd path; these tests compare gradients after an eval forward with the
dequantized-weight reference (a dense copy of ``W_hat``).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from qblora_pl.adapters import LoRA, QBLoRA
from qblora_pl.adapters.injection import inject_adapters
from qblora_pl.quantization import NF4
from qblora_pl.quantization.base_layers import dequantized_weight, is_nf4_linear, keep_nf4_layers_trainable

@pytest.fixture(autouse=True, params=["this_cpu", "avx512bf16_cpu"])
def cpu_kind(request, monkeypatch):
    """Run each test as this CPU is, and as a CPU with AVX512-BF16 (where bitsandbytes repacks).

    The second case makes every new ``Linear4bit`` believe the CPU has AVX512-BF16, so its
    eval forward takes bitsandbytes' repacking branch whatever machine runs the tests.
    """
    if request.param == "avx512bf16_cpu":
        import bitsandbytes.nn.modules as bnb_modules

        monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    return request.param


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _dense_reference(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose 4-bit layers are dense ``nn.Linear`` holding ``W_hat``."""
    reference = copy.deepcopy(model)
    for name, module in list(reference.named_modules()):
        for child_name, child in list(module.named_children()):
            if is_nf4_linear(child):
                dense = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                with torch.no_grad():
                    dense.weight.copy_(dequantized_weight(child, torch.float32))
                    if child.bias is not None:
                        dense.bias.copy_(child.bias.float())
                setattr(module, child_name, dense.requires_grad_(False))
    return reference


def _adapter_grads(model: nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        # torch warns "an autograd kernel was not registered" when the repacked path is taken.
        warnings.simplefilter("error", UserWarning)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _eval_forward(model: nn.Module, ids: torch.Tensor) -> None:
    """What Lightning's sanity check and every validation do."""
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)


def _randomize_adapters(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


@pytest.mark.parametrize("strategy", [LoRA(r=4, alpha=8, dropout=0.0), QBLoRA(r=4, alpha=8, dropout=0.0)], ids=["qlora", "qblora"])
def test_nf4_adapter_gradients_after_eval_forward_equal_dequantized_reference(tiny_model_dir, strategy):
    model = NF4(compute_dtype="float32").load(str(tiny_model_dir))
    inject_adapters(model, strategy, TARGETS)
    _randomize_adapters(model)  # non-zero B: gradients then flow through every layer's base
    reference = _dense_reference(model)
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))

    expected = _adapter_grads(reference, ids)
    before = _adapter_grads(model, ids)
    _eval_forward(model, ids)
    after = _adapter_grads(model, ids)

    assert set(expected) == set(after) and expected
    for name, grad in expected.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(before[name], grad, atol=1e-5, rtol=1e-4, msg=f"{name} (before eval)")
        torch.testing.assert_close(after[name], grad, atol=1e-5, rtol=1e-4, msg=f"{name} (after eval)")


def test_nf4_input_gradient_after_eval_forward_equals_dequantized_reference(tiny_model_dir):
    """One layer: d(loss)/dx through the frozen base after the layer ran in eval mode."""
    model = NF4(compute_dtype="float32").load(str(tiny_model_dir))
    layer = model.model.layers[0].mlp.down_proj
    w_hat = dequantized_weight(layer, torch.float32)
    x = torch.randn(3, layer.in_features)
    layer.eval()
    with torch.no_grad():
        layer(x)
    layer.train()
    x_grad = x.clone().requires_grad_(True)
    layer(x_grad).square().sum().backward()
    x_ref = x.clone().requires_grad_(True)
    (x_ref @ w_hat.T).square().sum().backward()
    torch.testing.assert_close(x_grad.grad, x_ref.grad, atol=1e-4, rtol=1e-4)


def test_an_already_repacked_layer_is_restored_before_training(tiny_model_dir):
    """A layer repacked before the backend saw it (e.g. by other code) trains correctly again."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    model = NF4(compute_dtype="float32").load(str(tiny_model_dir))
    layer = model.model.layers[0].self_attn.q_proj
    w_hat = dequantized_weight(layer, torch.float32)
    layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu(layer.weight.data, layer.weight.quant_state)
    assert layer.weight.quant_state.packing_format_for_cpu
    assert keep_nf4_layers_trainable(model) > 0
    assert not layer.weight.quant_state.packing_format_for_cpu
    x = torch.randn(2, layer.in_features, requires_grad=True)
    layer(x).sum().backward()
    # The repacking stored the block scales in bf16, so the restored weight is W_hat to bf16 precision.
    torch.testing.assert_close(x.grad, w_hat.sum(0).expand_as(x), atol=2e-2, rtol=1e-2)
