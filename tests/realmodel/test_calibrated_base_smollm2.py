"""GPTQ on real layers: SmolLM2-135M-Instruct's layers, calibrated on real chat-formatted Alpaca records."""

from __future__ import annotations

import pytest
import torch

from qblora_pl.quantization import GroupwiseIntQuantizer

pytestmark = pytest.mark.realmodel


@pytest.mark.parametrize("name", ["model.layers.5.self_attn.q_proj", "model.layers.20.mlp.down_proj"])
def test_gptq_lowers_a_real_layers_output_error_against_rtn_and_mse(smollm2_gguf, shared_data, name):
    from qblora_pl.data.datamodule import InstructionDataModule
    from qblora_pl.sources import load_causal_lm, pretrained_name_or_path

    model = load_causal_lm(str(smollm2_gguf), dtype=torch.float32).eval()
    data = InstructionDataModule(data_path=str(shared_data / "alpaca_5000.json"),
                                 tokenizer_name_or_path=pretrained_name_or_path(str(smollm2_gguf)),
                                 prompt_template="chat", max_source_length=128, max_target_length=128, drop_empty=True)
    data.setup("fit")
    layer, inputs = model.get_submodule(name), []
    handle = layer.register_forward_pre_hook(lambda _m, args: inputs.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        for sequence in data.calibration_set(48, 256).sequences:
            model(input_ids=sequence.unsqueeze(0))
    handle.remove()
    x = torch.cat(inputs)
    fit, held_out = x[: len(x) // 2], x[len(x) // 2:]  # the error is measured on inputs GPTQ did not see
    weight = layer.weight.detach()
    q = GroupwiseIntQuantizer(3, 32)

    def output_error(quantized):
        return float(((held_out @ (q.dequantize(*quantized) - weight).T) ** 2).mean())

    rtn = output_error(q.quantize(weight, torch.float16))
    mse = output_error(q.quantize(weight, torch.float16, params="mse"))
    gptq = output_error(q.quantize_gptq(weight, fit, param_dtype=torch.float16, params="mse"))
    assert mse < rtn
    assert gptq < 0.8 * rtn and gptq < mse, (rtn, mse, gptq)
