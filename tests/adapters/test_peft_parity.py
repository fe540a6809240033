"""Our LoRA over a bitsandbytes NF4 base equals HF PEFT's LoRA over the same base (QLoRA)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

from qblora_pl.adapters import LoRA  # noqa: E402


class _OneLayer(nn.Module):
    def __init__(self, proj: nn.Module) -> None:
        super().__init__()
        self.proj = proj
        self.is_loaded_in_4bit = True  # what PEFT's bnb dispatcher looks for

    def forward(self, x):
        return self.proj(x)


def _nf4_layer(d_in: int, d_out: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    dense = nn.Linear(d_in, d_out)
    layer = bnb.nn.Linear4bit(d_in, d_out, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    layer.load_state_dict(dense.state_dict())
    return layer.to("cpu")  # quantizes the weight to NF4


@pytest.mark.parametrize("d_in, d_out, r", [(128, 64, 8), (256, 128, 4)])
def test_lora_output_and_gradients_equal_peft(d_in, d_out, r):
    base = _nf4_layer(d_in, d_out, seed=0)
    assert isinstance(base, bnb.nn.Linear4bit) and base.weight.quant_state is not None

    ours = LoRA(r=r, alpha=2 * r, dropout=0.0).wrap("proj", base)
    with torch.no_grad():
        ours.adapter.lora_B.normal_(0, 0.1)  # non-zero B: with B = 0 the check is trivial

    model = peft.get_peft_model(
        _OneLayer(base),
        peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=["proj"]),
    )
    peft_layer = model.base_model.model.proj
    assert type(peft_layer).__module__.endswith("lora.bnb"), type(peft_layer)
    assert peft_layer.base_layer is base, "both must wrap the very same quantized base"
    with torch.no_grad():
        peft_layer.lora_A["default"].weight.copy_(ours.adapter.lora_A)
        peft_layer.lora_B["default"].weight.copy_(ours.adapter.lora_B)

    x = torch.randn(3, 7, d_in)
    x_ours, x_peft = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y_ours, y_peft = ours(x_ours), peft_layer(x_peft)
    assert (y_ours - base(x)).abs().max() > 1e-3
    torch.testing.assert_close(y_ours, y_peft, atol=1e-5, rtol=0)

    grad_out = torch.randn_like(y_ours)
    y_ours.backward(grad_out)
    y_peft.backward(grad_out)
    torch.testing.assert_close(x_ours.grad, x_peft.grad, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.adapter.lora_A.grad, peft_layer.lora_A["default"].weight.grad, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.adapter.lora_B.grad, peft_layer.lora_B["default"].weight.grad, atol=1e-5, rtol=0)


def test_dequantized_weight_survives_bnb_cpu_repacking():
    """bnb may repack NF4 weights in place on an eval no-grad forward (AVX512-BF16 CPUs);
    the weight our merges read must stay the layer's weight either way."""
    from qblora_pl.quantization.base_layers import dequantized_weight

    layer = _nf4_layer(128, 64, seed=0)
    before = dequantized_weight(layer).clone()
    x = torch.randn(2, 128)
    layer.eval()
    with torch.no_grad():
        y = layer(x)
    after = dequantized_weight(layer)
    assert (after - before).abs().max() <= 4e-3 * before.abs().max()  # bnb keeps absmax in bf16 there
    torch.testing.assert_close(x @ after.T + layer.bias, y, atol=2e-2, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), y)  # the layer itself is left as it was
