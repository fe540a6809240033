"""SmolLM2-135M-Instruct exported to compressed-tensors at INT4 and INT2 g64 (issue 33; g128 does not divide its 576-wide layers): transformers +
compressed-tensors load it, with its tokenizer, chat template and tied embeddings, to the logits and
greedy tokens of the model as trained with integer zero points."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.realmodel
pytest.importorskip("compressed_tensors")


@pytest.mark.parametrize("bits", [4, 2])
def test_qablora_g64_export_serves_the_trained_model(bits, smollm2_gguf, tmp_path):
    from qblora_pl.adapters import QABLoRA
    from qblora_pl.adapters.injection import adapted_layers
    from qblora_pl.export.compressed_tensors_writer import load_compressed_tensors
    from qblora_pl.export.exporter import CT_DIR, export_module
    from qblora_pl.module import QuantizedCausalLM
    from qblora_pl.qat import MergedOffsetFakeQuant
    from qblora_pl.quantization import GroupwiseInt
    from qblora_pl.sources import load_tokenizer

    module = QuantizedCausalLM(str(smollm2_gguf), quantization=GroupwiseInt(bits=bits, group_size=64),
                               adapter=QABLoRA(budget_rank=8, dropout=0.0))
    module.configure_model()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    for layer in adapted_layers(module.model).values():
        layer.fake_quant = MergedOffsetFakeQuant(zero_point="integer", strength=1.0)
    tokenizer = load_tokenizer(str(smollm2_gguf))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    model = module.model.eval()
    with torch.no_grad():
        trained = model(**prompt).logits
        trained_tokens = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    report = export_module(module, tmp_path / "out", formats=["compressed-tensors"], log=lambda _: None)
    assert report["formats"]["compressed-tensors"]["int_layers"] == 210

    folder = tmp_path / "out" / CT_DIR
    assert json.loads((folder / "config.json").read_text())["tie_word_embeddings"] is True
    served_tokenizer = load_tokenizer(str(folder))
    assert served_tokenizer.chat_template == tokenizer.chat_template
    served = load_compressed_tensors(folder)
    with torch.no_grad():
        logits = served(**prompt).logits
        tokens = served.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert (logits - trained).abs().max() < 1e-4
    assert torch.equal(tokens, trained_tokens)
