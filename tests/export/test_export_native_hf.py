"""Native low-bit and merged dense HF exports load back and reproduce the adapted model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from qblora_pl.adapters.base import AdaptedLinear
from qblora_pl.export import export_module, load_native
from qblora_pl.export.verify import fixed_token_batch
from qblora_pl.quantization.int_layer import GroupwiseIntLinear


@torch.no_grad()
def _logits(model, batch):
    model.eval()
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()


def _assert_unmerged(module):
    layers = [m for m in module.model.modules() if isinstance(m, AdaptedLinear)]
    assert layers and not any(layer.merged for layer in layers)


def test_native_round_trip_is_exact_for_qablora(qablora_module, tmp_path):
    batch = fixed_token_batch(qablora_module.model.config.vocab_size)
    adapted = _logits(qablora_module.model, batch)  # unmerged: base + adapter forward
    base_codes = {
        name: layer.base_layer.packed_codes.clone()
        for name, layer in qablora_module.model.named_modules()
        if isinstance(layer, AdaptedLinear)
    }
    report = export_module(qablora_module, tmp_path, formats=["native"], verify=True, log=lambda _: None)
    _assert_unmerged(qablora_module)

    loaded = load_native(tmp_path / "native")
    assert torch.allclose(_logits(loaded, batch), adapted, atol=1e-4, rtol=0)
    assert report["formats"]["native"]["verification"]["max_abs_logit_diff"] == 0.0  # vs in-memory merged

    meta = json.loads((tmp_path / "native" / "qblora_config.json").read_text())
    assert meta["bits"] == 4 and meta["group_size"] == 32 and meta["method"]["adapter"]["class"] == "QABLoRA"
    assert meta["hf_config"]["model_type"] == "llama" and meta["layers"]["lm_head"]["storage"] == "dense"
    tensors = load_file(tmp_path / "native" / "model.safetensors")
    for name, codes in base_codes.items():
        assert meta["layers"][name]["merge"] == "offsets"
        assert tensors[f"{name}.offsets"].dtype == torch.float32  # the folded update is kept exactly
        assert torch.equal(tensors[f"{name}.packed_codes"], codes)  # codes untouched by the merge
        assert isinstance(loaded.get_submodule(name), GroupwiseIntLinear)
    assert (tmp_path / "native" / "tokenizer.json").is_file()
    assert (tmp_path / "export_report.json").is_file()


def test_hf_dense_round_trip(qablora_module, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    batch = fixed_token_batch(qablora_module.model.config.vocab_size, seed=1)
    adapted = _logits(qablora_module.model, batch)
    export_module(qablora_module, tmp_path, formats=["hf"], dense_dtype="float32", verify=False, log=lambda _: None)
    _assert_unmerged(qablora_module)

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert not hasattr(loaded.config, "quantization_config")
    assert loaded.dtype == torch.float32
    assert torch.allclose(_logits(loaded, batch), adapted, atol=1e-4, rtol=0)
    assert AutoTokenizer.from_pretrained(tmp_path / "hf").bos_token == "<s>"


def test_hf_dense_float16_is_close(qablora_module, tmp_path):
    report = export_module(qablora_module, tmp_path, formats=["hf"], log=lambda _: None)
    assert report["formats"]["hf"]["dtype"] == "float16"
    check = report["formats"]["hf"]["verification"]
    assert 0 < check["max_abs_logit_diff"] < 0.05 and check["argmax_agreement"] > 0.95


def test_nf4_export_after_an_eval_forward_matches_a_fresh_one(tiny_model_dir, tmp_path):
    """bitsandbytes repacks NF4 weights in place on the first eval forward on CPUs with
    AVX512-BF16; the merge must not read that layout as if it were the original one."""
    from tests.export.conftest import adapted_module

    module = adapted_module(tiny_model_dir, "qlora")
    kwargs = dict(formats=["hf"], verify=False, dense_dtype="float32", log=lambda _: None)
    export_module(module, tmp_path / "fresh", **kwargs)
    batch = fixed_token_batch(module.model.config.vocab_size)
    _logits(module.model, batch)  # may repack the NF4 weights (CPU, eval, no grad)
    export_module(module, tmp_path / "after", **kwargs)
    fresh = load_file(tmp_path / "fresh" / "hf" / "model.safetensors")
    after = load_file(tmp_path / "after" / "hf" / "model.safetensors")
    for key, weight in fresh.items():
        # bitsandbytes' repacking rounds the block absmax to bf16: tiny, but not zero.
        assert (after[key] - weight).norm() <= 1e-3 * weight.norm(), key


def test_native_fast_int4_load_is_close_and_opt_in(qablora_module, tmp_path):
    """``load_native(..., fast_int4=True)``: every INT4 layer on torch's INT4 kernel (bf16
    compute), logits close to the exact load; the default load stays exact."""
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        pytest.skip("torch has no CPU INT4 kernel")
    batch = fixed_token_batch(qablora_module.model.config.vocab_size, seed=2)
    export_module(qablora_module, tmp_path, formats=["native"], verify=False, log=lambda _: None)
    exact_model = load_native(tmp_path / "native")
    fast_model = load_native(tmp_path / "native", fast_int4=True)
    layers = [m for m in fast_model.modules() if isinstance(m, GroupwiseIntLinear)]
    assert layers and all(m.int4_kernel_enabled for m in layers)
    assert not any(m.int4_kernel_enabled for m in exact_model.modules() if isinstance(m, GroupwiseIntLinear))
    exact, fast = _logits(exact_model, batch), _logits(fast_model, batch)
    assert float((fast - exact).norm() / exact.norm()) < 2e-2
    assert (fast.argmax(-1) == exact.argmax(-1)).float().mean() > 0.9
