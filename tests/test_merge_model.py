"""Whole-model merges on the embedded pretrained model (docs/method.md sections 3-4).

QA-LoRA / QA-BLoRA with non-zero adapters merge into the INT-b offsets: the merged model's
logits equal the unmerged model's, every weight stays b-bit, and unmerge restores it.
"""

from __future__ import annotations

import pytest
import torch

from qblora_pl.adapters import LoRA, QABLoRA, QALoRA, QBLoRA
from qblora_pl.adapters.injection import adapted_layers
from qblora_pl.merging import merge_adapters, merged, requantize_merged, unmerge_adapters
from qblora_pl.module import QuantizedCausalLM
from qblora_pl.paths import EMBEDDED_MODEL_DIR
from qblora_pl.quantization import NF4, GroupwiseInt
from qblora_pl.quantization.int_layer import GroupwiseIntLinear


def _module(quantization, adapter) -> QuantizedCausalLM:
    module = QuantizedCausalLM(str(EMBEDDED_MODEL_DIR), quantization=quantization, adapter=adapter)
    module.configure_model()
    module.model.eval()
    torch.manual_seed(0)
    with torch.no_grad():  # a zero adapter proves nothing
        for layer in adapted_layers(module.model).values():
            for p in layer.adapter.parameters():
                p.normal_(0, 0.02)
    return module


def _ids(module) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randint(3, module.model.config.vocab_size, (2, 48))


@pytest.mark.parametrize("adapter", [QALoRA(r=8, dropout=0.0), QABLoRA(budget_rank=8, dropout=0.0)], ids=["qalora", "qablora"])
@pytest.mark.parametrize("bits", [4, 2])
def test_qa_merge_is_exact_and_low_bit_on_embedded_model(adapter, bits):
    module = _module(GroupwiseInt(bits=bits, group_size=32), adapter)
    ids = _ids(module)
    with torch.no_grad():
        unmerged = module.model(ids).logits
        base_codes = {n: l.base_layer.packed_codes.clone() for n, l in adapted_layers(module.model).items()}
        how = merge_adapters(module.model)
        merged_logits = module.model(ids).logits
    assert set(how.values()) == {"offsets"}
    assert (merged_logits - unmerged).abs().max() <= 1e-4
    for name, layer in adapted_layers(module.model).items():
        assert isinstance(layer.base_layer, GroupwiseIntLinear) and layer.base_layer.bits == bits
        assert torch.equal(layer.base_layer.packed_codes, base_codes[name])
    unmerge_adapters(module.model)
    with torch.no_grad():
        torch.testing.assert_close(module.model(ids).logits, unmerged, atol=0, rtol=0)


@pytest.mark.parametrize("adapter", [LoRA(r=8, dropout=0.0), QBLoRA(r=8, dropout=0.0)], ids=["lora", "qblora"])
def test_dense_merge_is_exact_and_requantization_is_lossy(adapter):
    """LoRA / Q-BLoRA merge into a dense copy of W_hat + dW exactly; re-quantizing it is lossy.

    Run on the INT-b base, whose forward is exact fp32 arithmetic on CPU, so any difference
    is the merge's own.
    """
    module = _module(GroupwiseInt(bits=4, group_size=32), adapter)
    ids = _ids(module)
    with torch.no_grad():
        unmerged = module.model(ids).logits
        with merged(module.model):
            dense = module.model(ids).logits
        merge_adapters(module.model)
        requantize_merged(module.model, bits=2, group_size=32)
        requantized = module.model(ids).logits
    assert (dense - unmerged).abs().max() <= 1e-4
    assert (requantized - unmerged).abs().max() > 1e-2


@pytest.mark.parametrize("avx512bf16", [False, True], ids=["this_cpu", "avx512bf16_cpu"])
def test_nf4_dense_merge_is_exact(avx512bf16, monkeypatch):
    """The unmerged NF4 model computes with W_hat in fp32 (its layers are kept off bitsandbytes'
    bf16 CPU inference kernel, which also has no autograd), so the fp32 dense merge gives the
    same logits - also where the CPU has AVX512-BF16 (emulated: bitsandbytes then repacks on an
    eval forward unless told not to)."""
    if avx512bf16:
        import bitsandbytes.nn.modules as bnb_modules

        monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    module = _module(NF4(), QBLoRA(r=8, dropout=0.0))
    module.model.eval()
    ids = _ids(module)
    with torch.no_grad():
        unmerged = module.model(ids).logits
        with merged(module.model):
            dense = module.model(ids).logits
    assert (dense - unmerged).abs().max() <= 1e-4
