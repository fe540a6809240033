"""SmolLM2-135M-Instruct end to end: GGUF in, NF4 gradients after an eval forward, chat answers."""

from __future__ import annotations

import pytest
import torch

from tests.quantization.test_nf4_gradients import _adapter_grads, _dense_reference

pytestmark = pytest.mark.realmodel

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_gguf_file_loads_model_and_tokenizer_with_chat_template(smollm2_gguf):
    from qblora_pl.adapters.injection import count_parameters
    from qblora_pl.sources import ModelSource, load_causal_lm, load_tokenizer

    assert ModelSource.parse(str(smollm2_gguf)).kind == "gguf"
    assert ModelSource.parse(str(smollm2_gguf.parent)).kind == "gguf"  # a folder with one .gguf
    tokenizer = load_tokenizer(str(smollm2_gguf))
    model = load_causal_lm(str(smollm2_gguf), dtype=torch.float32).eval()
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert model.config.tie_word_embeddings
    _, total = count_parameters(model)
    assert 134_000_000 < total < 135_000_000  # tied embeddings counted once
    assert tokenizer.chat_template

    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.parametrize("cpu_kind", ["this_cpu", "avx512bf16_cpu"])
def test_nf4_qblora_gradients_after_validation_equal_dequantized_reference(smollm2_gguf, cpu_kind, monkeypatch):
    """The real-model check of the NF4 fix: adapter gradients to 1e-5 of the W_hat reference."""
    from qblora_pl.adapters import QBLoRA
    from qblora_pl.adapters.injection import inject_adapters
    from qblora_pl.quantization import NF4

    if cpu_kind == "avx512bf16_cpu":  # bitsandbytes then repacks on eval forwards, whatever this CPU is
        import bitsandbytes.nn.modules as bnb_modules

        monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    model = NF4(compute_dtype="float32").load(str(smollm2_gguf))
    inject_adapters(model, QBLoRA(r=8, alpha=16, dropout=0.0), TARGETS)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    reference = _dense_reference(model)
    ids = torch.randint(100, 40000, (2, 16), generator=g)
    expected = _adapter_grads(reference, ids)
    model.eval()
    with torch.no_grad():  # what a validation does
        model(input_ids=ids)
    after = _adapter_grads(model, ids)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.15.mlp.down_proj", "model.layers.29.mlp.up_proj"):
        for key in [k for k in expected if k.startswith(name)]:
            assert expected[key].abs().max() > 0
    worst = max(float((after[k] - expected[k]).abs().max()) for k in expected)
    assert worst < 1e-5, f"max |grad - reference| = {worst:.3e}"


@pytest.mark.parametrize("config", ["qlora", "qblora", "qalora", "qablora"])
def test_every_method_config_fits_from_the_gguf_file(smollm2_gguf, config, tmp_path):
    """`main.py fit` of each shipped method config on the real model, chat data, validating
    before the training steps (the path that lost NF4 gradients): no autograd warning, finite loss."""
    import json
    import os
    import subprocess
    import sys

    from tests.realmodel.conftest import REPO

    records = [
        {"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                      {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]}
        for a in range(6) for b in range(4)
    ]
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in records))
    cmd = [sys.executable, str(REPO / "main.py"), "fit", "--config", str(REPO / "configs" / f"{config}.yaml"),
           "--config", str(REPO / "configs" / "smollm2.yaml"), "--model.model_name_or_path", str(smollm2_gguf),
           "--data.data_path", str(data), "--data.batch_size", "2", "--trainer.max_steps", "2",
           "--trainer.val_check_interval", "1", "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "1",
           "--trainer.logger", "false", "--trainer.callbacks=[]", "--trainer.enable_checkpointing", "false"]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "PYTHONWARNINGS": "default"})
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "autograd kernel was not registered" not in output
    assert "max_steps=2` reached" in output
