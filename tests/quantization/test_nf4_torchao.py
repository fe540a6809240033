"""NF4 on torchao's NF4Tensor (``NF4(implementation="torchao")``), in one process.

The training forward must compute with exactly the ``W_hat`` that merges and exports read
(``TorchaoNF4Linear.dequantize``), its backward must give the input gradient through ``W_hat``
(the adapters need it) whatever ran before, and the dense QLoRA / Q-BLoRA merge must be exact,
as on the bitsandbytes base. torchao's ``W_hat`` is compared with bitsandbytes' for the same
weights: the same NF4 codes almost everywhere, different double-quantized scales.
"""

from __future__ import annotations

import copy
import glob
import sys

import pytest
import torch
from torch import nn

pytest.importorskip("torchao", reason="NF4(implementation='torchao') needs the fsdp-nf4 extra")

from qblora_pl.adapters import LoRA, QBLoRA  # noqa: E402
from qblora_pl.adapters.injection import adapted_layers, inject_adapters  # noqa: E402
from qblora_pl.merging import merged  # noqa: E402
from qblora_pl.paths import EMBEDDED_MODEL_DIR  # noqa: E402
from qblora_pl.quantization import NF4  # noqa: E402
from qblora_pl.quantization.base_layers import dequantized_weight, describe_base, is_base_linear, logical_numel  # noqa: E402
from qblora_pl.quantization.torchao_nf4 import (  # noqa: E402
    TorchaoNF4Linear,
    nf4_storage_bytes,
    scaler_block_size_for,
    torchao_nf4,
)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
#: torchao's 16 NF4 levels (QLoRA's, rounded to 4 decimals).
NF4_LEVELS = [-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0, 0.0796, 0.1609, 0.2461, 0.3379,
              0.4407, 0.5626, 0.7230, 1.0]


def _layer(d_out: int, d_in: int, bias: bool = False, seed: int = 0, **kwargs) -> TorchaoNF4Linear:
    torch.manual_seed(seed)
    return TorchaoNF4Linear.from_linear(nn.Linear(d_in, d_out, bias=bias), **kwargs)


def test_double_quantized_scales_by_hand():
    """Four blocks of 64 whose values are NF4 levels times absmax 1, 2, 3, 4 (one scaler block of 4).

    The block absmaxes have mean 2.5; centred (-1.5, -0.5, 0.5, 1.5) they are quantized to int8 with
    the factor 256 / (2 * 1.5): -1.5 -> -128, -0.5 -> -42.67 -> -43, 0.5 -> 43, 1.5 -> 128 -> 127.
    Dequantized: 2.5 + q * 3/256 = 1.0, 1.99609375, 3.00390625, 3.98828125 - so every weight comes
    back as its NF4 level times those scales, and the last two blocks show the int8 rounding."""
    levels = torch.tensor(NF4_LEVELS * 4)  # 64 values per block, the 16 levels 4 times
    absmax = torch.tensor([1.0, 2.0, 3.0, 4.0])
    weight = (levels.view(1, 64) * absmax.view(4, 1)).reshape(2, 128)
    layer = TorchaoNF4Linear.from_linear(_linear_with(weight), max_scaler_block_size=256)
    assert layer.scaler_block_size == 4  # the largest power of two <= 256 dividing the 4 blocks
    expected_scales = torch.tensor([1.0, 1.99609375, 3.00390625, 3.98828125])
    expected = (levels.view(1, 64) * expected_scales.view(4, 1)).reshape(2, 128)
    torch.testing.assert_close(layer.dequantize(), expected, rtol=0, atol=2e-7)


def _linear_with(weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_and_input_gradient_equal_the_dequantized_reference(dtype):
    layer = _layer(96, 128, bias=True)
    w_hat = layer.dequantize()
    torch.manual_seed(1)
    x = torch.randn(3, 5, 128, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(3, 5, 96, dtype=dtype)
    y = layer(x)
    y.backward(grad_out)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = nn.functional.linear(x_ref, w_hat.to(dtype)) + layer.bias.to(dtype)  # the bias is added after the matmul
    y_ref.backward(grad_out)
    assert y.dtype == dtype and torch.equal(y, y_ref)
    assert torch.equal(x.grad, x_ref.grad)
    assert layer.weight.grad is None and not layer.weight.requires_grad


def test_base_layer_view_reads_the_torchao_layer():
    layer = _layer(64, 256)
    assert is_base_linear(layer) and describe_base(layer) == "torchao NF4"
    assert logical_numel(layer) == 64 * 256
    assert torch.equal(dequantized_weight(layer, torch.float32), layer.dequantize(torch.float32))
    # Bytes actually stored: 4-bit codes, int8 scale per block of 64, fp32 factor per 256 blocks,
    # fp32 mean and the 16 fp32 levels.
    assert nf4_storage_bytes(layer.weight) == 64 * 256 // 2 + 64 * 256 // 64 + 4 * 1 + 4 + 16 * 4


@pytest.mark.parametrize(
    "shape,expected",
    [((256, 256), 256), ((768, 256), 256), ((192, 576), 64), ((576, 576), 64), ((64, 64), 64), ((64, 96), 32)],
)
def test_scaler_block_is_the_largest_power_of_two_dividing_the_block_count(shape, expected):
    # 192 x 576 (SmolLM2-135M's k_proj): 1728 blocks = 27 * 64; torchao's default 256 would refuse it.
    assert scaler_block_size_for(shape[0] * shape[1]) == expected
    assert scaler_block_size_for(shape[0] * shape[1], max_scaler_block_size=32) == min(expected, 32)
    with pytest.raises(ValueError, match="100 weights are not a whole number of NF4 blocks of 64"):
        scaler_block_size_for(100)


def test_w_hat_is_close_to_bitsandbytes_but_not_bit_identical():
    """Same weights, both with double quantization: the 4-bit codes agree almost everywhere (they
    differ at near-ties: torchao's levels are rounded to 4 decimals), the dequantized scales do not
    (torchao: int8 around the mean scale, one fp32 factor per 256 blocks; bitsandbytes: its dynamic
    8-bit map, one factor per 256 blocks), so W_hat differs by ~0.4% of ||W|| while both are ~9%
    from W."""
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit
    from safetensors.torch import load_file

    weights = load_file(glob.glob(str(EMBEDDED_MODEL_DIR / "*.safetensors"))[0])
    w = weights["model.layers.0.self_attn.q_proj.weight"].float()
    layer = TorchaoNF4Linear.from_linear(_linear_with(w))
    packed, state = quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    bnb_codes = torch.stack([packed.flatten() >> 4, packed.flatten() & 15], -1).flatten()
    data = layer.weight.quantized_data
    torchao_codes = torch.stack([data >> 4, data & 15], -1).flatten()
    code_agreement = (bnb_codes == torchao_codes).float().mean().item()
    w_torchao, w_bnb = layer.dequantize(torch.float32), dequantize_4bit(packed, state).float()
    apart = float((w_torchao - w_bnb).norm() / w.norm())
    error_torchao, error_bnb = (float((v - w).norm() / w.norm()) for v in (w_torchao, w_bnb))
    assert 0.999 < code_agreement < 1.0, code_agreement
    assert not torch.equal(w_torchao, w_bnb)
    assert 1e-4 < apart < 1e-2, apart
    assert abs(error_torchao - error_bnb) < 0.05 * error_bnb, (error_torchao, error_bnb)


# ---------------------------------------------------------------------------------- backend
def test_backend_arguments_and_what_checkpoints_record():
    assert NF4().init_args() == {"quant_type": "nf4", "double_quant": True, "compute_dtype": "auto"}
    assert NF4(implementation="torchao", scaler_block_size=32).init_args() == {
        "quant_type": "nf4", "double_quant": True, "compute_dtype": "auto", "implementation": "torchao", "scaler_block_size": 32}
    with pytest.raises(ValueError, match="implementation='cuda' must be one of"):
        NF4(implementation="cuda")
    with pytest.raises(ValueError, match="NF4 with double quantization only; got quant_type='fp4', double_quant=True"):
        NF4(quant_type="fp4", implementation="torchao")
    with pytest.raises(ValueError, match="scaler_block_size=100 must be a power of two"):
        NF4(implementation="torchao", scaler_block_size=100)
    with pytest.raises(ValueError, match="scaler_block_size=32 applies to implementation='torchao' only"):
        NF4(scaler_block_size=32)


def test_missing_torchao_is_reported_with_the_install_command(monkeypatch):
    torchao_nf4.cache_clear()
    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    monkeypatch.setitem(sys.modules, "torchao.dtypes", None)
    try:
        with pytest.raises(ImportError, match=r"pip install 'qblora-pl\[fsdp-nf4\]'"):
            NF4(implementation="torchao").load(str(EMBEDDED_MODEL_DIR))
    finally:
        monkeypatch.undo()
        torchao_nf4.cache_clear()


@pytest.fixture(scope="module")
def torchao_model():
    model = NF4(implementation="torchao", compute_dtype="float32").load(str(EMBEDDED_MODEL_DIR))
    kinds = {type(m).__name__ for n, m in model.named_modules() if n.endswith(tuple(TARGETS))}
    assert kinds == {"TorchaoNF4Linear"} and type(model.lm_head) is nn.Linear
    return model


def _dense_reference(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose NF4 layers are dense ``nn.Linear`` holding ``W_hat``."""
    reference = copy.deepcopy(model)
    for module in list(reference.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, TorchaoNF4Linear):
                setattr(module, child_name, _linear_with(child.dequantize(torch.float32)).requires_grad_(False))
    return reference


def _randomize_adapters(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def _adapter_grads(model: nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("strategy", [LoRA(r=4, dropout=0.0), QBLoRA(r=4, dropout=0.0)], ids=["qlora", "qblora"])
def test_adapter_gradients_after_an_eval_forward_equal_the_w_hat_reference(torchao_model, strategy):
    """Lightning's sanity check and every validation run an eval, no-grad forward first; the next
    training step's gradients must still flow through W_hat (bitsandbytes needed a fix for that)."""
    model = copy.deepcopy(torchao_model)
    inject_adapters(model, strategy, TARGETS)
    _randomize_adapters(model)
    reference = _dense_reference(model)
    ids = torch.randint(3, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(5))
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    grads, expected = _adapter_grads(model, ids), _adapter_grads(reference, ids)
    assert grads.keys() == expected.keys() and len(grads) == 2 * 7 * model.config.num_hidden_layers
    for name in grads:
        assert grads[name].abs().sum() > 0, name
        torch.testing.assert_close(grads[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("strategy", [LoRA(r=8, dropout=0.0), QBLoRA(r=8, dropout=0.0)], ids=["qlora", "qblora"])
def test_nf4_torchao_dense_merge_is_exact(strategy):
    """As test_merge_model.test_nf4_dense_merge_is_exact on bitsandbytes: the fp32 dense merge
    W_hat + dW gives the unmerged model's logits; unmerge restores the NF4 layers."""
    from qblora_pl.module import QuantizedCausalLM

    module = QuantizedCausalLM(str(EMBEDDED_MODEL_DIR), quantization=NF4(implementation="torchao"), adapter=strategy)
    module.configure_model()
    module.model.eval()
    _randomize_adapters(module.model)
    ids = torch.randint(3, module.model.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = copy.deepcopy(module.model)
        for layer in adapted_layers(base).values():
            layer.merged = True  # the base alone: skip the adapter
        base_logits = base(ids).logits
        unmerged = module.model(ids).logits
        with merged(module.model):
            dense = module.model(ids).logits
            assert {type(layer.base_layer).__name__ for layer in adapted_layers(module.model).values()} == {"Linear"}
        restored = module.model(ids).logits
    assert (dense - unmerged).abs().max() <= 1e-4
    assert (unmerged - base_logits).abs().max() > 1e-2  # the adapters change the output
    assert torch.equal(restored, unmerged)
    assert {type(layer.base_layer).__name__ for layer in adapted_layers(module.model).values()} == {"TorchaoNF4Linear"}


def test_export_snapshot_reads_frozen_torchao_layers_as_their_w_hat(torchao_model):
    """Layers without an adapter are exported as their dequantized W_hat, as bitsandbytes' are."""
    from qblora_pl.export.snapshot import FROZEN_NF4, snapshot_merged_model
    from qblora_pl.merging import merge_adapters

    model = copy.deepcopy(torchao_model)
    inject_adapters(model, LoRA(r=4, dropout=0.0), ["q_proj"])
    merge_adapters(model)
    snapshot = snapshot_merged_model(model)
    frozen = snapshot.linears["model.layers.1.mlp.down_proj"]
    assert frozen.origin == FROZEN_NF4
    assert torch.equal(frozen.dense_weight(), model.model.layers[1].mlp.down_proj.dequantize(torch.float32))


# ---------------------------------------------------------------------------------- configs
def test_yaml_chooses_torchao_nf4_and_composes_with_fsdp(tmp_path, monkeypatch):
    from tests.test_configs import CONFIG_DIR, _cli

    monkeypatch.chdir(tmp_path)
    override = tmp_path / "torchao.yaml"
    override.write_text("model:\n  quantization:\n    init_args:\n      implementation: torchao\n      scaler_block_size: 64\n")
    for method, strategy in (("qlora", LoRA), ("qblora", QBLoRA)):
        cli = _cli(["--config", str(CONFIG_DIR / f"{method}.yaml"), "--config", str(CONFIG_DIR / "fsdp.yaml"),
                    "--config", str(override)])
        assert isinstance(cli.model.quantization, NF4) and isinstance(cli.model.adapter, strategy)
        assert (cli.model.quantization.implementation, cli.model.quantization.scaler_block_size) == ("torchao", 64)
        assert cli.model.hparams["quantization"]["init_args"]["implementation"] == "torchao"
        assert type(cli.trainer.strategy).__name__ == "FSDP2Strategy"
    cli = _cli(["--config", str(CONFIG_DIR / "qblora.yaml"), "--model.quantization.init_args.implementation", "torchao"])
    assert cli.model.quantization.implementation == "torchao" and cli.model.quantization.scaler_block_size == 256


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_layer_computes_with_its_w_hat_and_matches_the_cpu_codes():
    torch.manual_seed(0)
    linear = nn.Linear(256, 128, bias=False)
    cpu = TorchaoNF4Linear.from_linear(linear)
    gpu = TorchaoNF4Linear.from_linear(linear.cuda())
    assert torch.equal(gpu.weight.quantized_data.cpu(), cpu.weight.quantized_data)
    bf16 = TorchaoNF4Linear.from_linear(linear.to(torch.bfloat16))
    x = torch.randn(4, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = bf16(x)
    y.sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    nn.functional.linear(x_ref, bf16.dequantize()).sum().backward()
    assert y.dtype == torch.bfloat16 and torch.equal(y, nn.functional.linear(x.detach(), bf16.dequantize()))
    assert torch.equal(x.grad, x_ref.grad)
