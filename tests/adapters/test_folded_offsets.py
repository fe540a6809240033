"""QA-LoRA / QA-BLoRA train through the base's offsets: with autograd on and no adapter dropout, the
update is added to the offsets as the merge adds it, so one dequantized matmul gives the merged
layer's output. The separate adapter branch (``fold_offsets = False``) is the reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qblora_pl.adapters import QABLoRA, QALoRA
from qblora_pl.quantization.int_layer import GroupwiseIntLinear

D_IN, D_OUT, GROUP = 256, 128, 32
STRATEGIES = {
    "qalora": lambda **kw: QALoRA(r=4, **kw),
    "qablora": lambda **kw: QABLoRA(budget_rank=4, **kw),
    "qablora_scales": lambda **kw: QABLoRA(budget_rank=4, scale_rank=2, **kw),
    "qablora_window64": lambda **kw: QABLoRA(budget_rank=4, pool_window=64, **kw),
}


def _layer(name, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    base = GroupwiseIntLinear.from_linear(nn.Linear(D_IN, D_OUT), bits=3, group_size=GROUP)
    layer = STRATEGIES[name](dropout=dropout).wrap("layer", base)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in layer.adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return layer.train()


def _step(layer, x, fold):
    layer.fold_offsets = fold
    layer.zero_grad()
    x = x.clone().requires_grad_()
    y = layer(x)
    y.square().mean().backward()
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in layer.adapter.named_parameters()}


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_folded_forward_is_the_merged_layer_and_gradients_match_the_adapter_branch(name):
    layer = _layer(name)
    x = torch.randn(3, 7, D_IN, generator=torch.Generator().manual_seed(5))
    assert layer._folds_into_offsets()
    y_fold, gx_fold, grads_fold = _step(layer, x, True)
    y_branch, gx_branch, grads_branch = _step(layer, x, False)
    with torch.no_grad():
        layer.merge()
        y_merged = layer(x)
        layer.unmerge()
    assert torch.equal(y_fold, y_merged)  # training computes the deployed model, bit for bit
    torch.testing.assert_close(y_fold, y_branch, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx_fold, gx_branch, rtol=1e-5, atol=1e-6)
    assert grads_fold.keys() == grads_branch.keys()
    for param, grad in grads_branch.items():
        assert grad.abs().max() > 0
        torch.testing.assert_close(grads_fold[param], grad, rtol=1e-4, atol=1e-4 * grad.abs().max().item())


def test_the_adapter_branch_is_kept_where_folding_cannot_compute_the_same_thing():
    layer = _layer("qablora", dropout=0.1)
    assert not layer._folds_into_offsets()  # dropout acts on x before pooling; offsets cannot carry it
    layer.eval()
    assert layer._folds_into_offsets()  # dropout off in eval
    with torch.no_grad():  # inference keeps its own paths (dequantized-weight cache, INT4 kernel)
        assert not layer._folds_into_offsets()
    layer = _layer("qablora").train()
    layer.fold_offsets = False
    assert not layer._folds_into_offsets()
