"""Calibrated INT-b bases: the MSE group search, GPTQ on real layers, true-sequential calibration,
the ``GroupwiseInt(init=...)`` backend, its on-disk cache and what checkpoints record of it."""

from __future__ import annotations

import pytest
import torch

from qblora_pl.checkpoints import AdapterCheckpointMismatch, check_adapter_spec
from qblora_pl.data.datamodule import InstructionDataModule
from qblora_pl.paths import EMBEDDED_MODEL, resolve_model_reference
from qblora_pl.quantization import GroupwiseInt, GroupwiseIntLinear, GroupwiseIntQuantizer
from qblora_pl.quantization import calibration as calibration_module
from qblora_pl.quantization.calibration import select_calibration
from qblora_pl.quantization.group_search import minmax_group_params, mse_group_params, round_codes

MODEL = resolve_model_reference(EMBEDDED_MODEL)


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _group_error(groups, scale, offset, max_code):
    codes = round_codes(groups, scale, offset, max_code)
    return ((groups - (codes * scale.unsqueeze(-1) + offset.unsqueeze(-1))) ** 2).sum(-1)


@pytest.fixture(scope="module")
def embedded_data():
    data = InstructionDataModule(tokenizer_name_or_path=MODEL, batch_size=4)
    data.setup("fit")
    return data


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QBLORA_PL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# --------------------------------------------------------------------------- MSE group search
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_mse_search_is_never_worse_than_minmax_and_stores_representable_parameters(bits):
    # Heavy-tailed groups (a few outliers), where min-max wastes the code range.
    w = _randn(64, 8, 32, seed=bits) * (1 + 4 * (_randn(64, 8, 32, seed=10 + bits).abs() > 2.2))
    max_code = (1 << bits) - 1
    minmax = _group_error(w, *minmax_group_params(w, max_code, torch.float16), max_code)
    scale, offset = mse_group_params(w, max_code, torch.float16)
    searched = _group_error(w, scale, offset, max_code)
    assert (searched <= minmax).all()
    assert searched.sum() < 0.9 * minmax.sum()
    assert torch.equal(scale, scale.half().float()) and torch.equal(offset, offset.half().float())
    assert (scale > 0).all()


def test_mse_search_keeps_constant_groups_exact():
    w = torch.full((4, 2, 32), 0.3)
    scale, offset = mse_group_params(w, 7, None)
    codes = round_codes(w, scale, offset, 7)
    assert torch.equal(codes * scale.unsqueeze(-1) + offset.unsqueeze(-1), w)


# --------------------------------------------------------------------------- GPTQ on a real layer
def _real_layer_inputs(data, layer_name="model.layers.1.mlp.down_proj", records=32):
    """A real linear layer of the embedded model and its real inputs on the embedded training data."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    layer = model.get_submodule(layer_name)
    inputs = []
    handle = layer.register_forward_pre_hook(lambda _m, args: inputs.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        for sequence in data.calibration_set(records, 64).sequences:
            model(input_ids=sequence.unsqueeze(0))
    handle.remove()
    return layer.weight.detach(), torch.cat(inputs)


def test_gptq_lowers_a_real_layers_output_error_against_rtn_and_mse(embedded_data):
    weight, x = _real_layer_inputs(embedded_data)
    fit, held_out = x[: len(x) // 2], x[len(x) // 2:]
    q = GroupwiseIntQuantizer(3, 32)

    def output_error(quantized):
        w_hat = q.dequantize(*quantized)
        return float(((held_out @ (w_hat - weight).T) ** 2).mean())

    rtn = output_error(q.quantize(weight, torch.float16))
    mse = output_error(q.quantize(weight, torch.float16, params="mse"))
    gptq = output_error(q.quantize_gptq(weight, fit, param_dtype=torch.float16, params="mse"))
    assert gptq < 0.9 * rtn and gptq < mse  # on inputs GPTQ did not see


# --------------------------------------------------------------------------- calibration set
def test_calibration_set_is_deterministic_cut_and_in_split_order(embedded_data):
    a = embedded_data.calibration_set(16, 20)
    b = embedded_data.calibration_set(16, 20)
    assert a.digest == b.digest and len(a.sequences) == 16
    assert max(len(s) for s in a.sequences) <= 20
    assert embedded_data.calibration_set(16, 21).digest != a.digest
    examples = [torch.arange(n) for n in range(1, 6)]
    small = select_calibration(examples, records=10, seq_len=3, seed=0)  # fewer examples than records: all
    assert [s.tolist() for s in small.sequences] == [[0], [0, 1], [0, 1, 2], [0, 1, 2], [0, 1, 2]]
    with pytest.raises(ValueError, match="calibration_records=0"):
        select_calibration(examples, records=0, seq_len=3, seed=0)


# --------------------------------------------------------------------------- true-sequential GPTQ
def _q_proj_1_input(model, input_ids):
    """What ``model``'s layer 1 q_proj is fed for ``input_ids``."""
    seen = []
    handle = model.model.layers[1].self_attn.q_proj.register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].detach().clone()))
    with torch.no_grad():
        model(input_ids=input_ids.unsqueeze(0))
    handle.remove()
    return seen[0]


def test_each_layer_is_calibrated_on_the_outputs_of_the_quantized_layers_before_it(embedded_data, cache, monkeypatch):
    """The Hessian inputs of layer 1 are what the final (quantized) model feeds layer 1, not the dense model's."""
    layer_1_inputs = []
    original_quantize = calibration_module.quantize_model_gptq

    def quantize_recording_layer_1(model, **kwargs):
        target = model.model.layers[1].self_attn.q_proj
        handle = target.register_forward_pre_hook(lambda _m, args: layer_1_inputs.append(args[0].detach().clone()))
        try:
            return original_quantize(model, **kwargs)
        finally:
            handle.remove()

    monkeypatch.setattr("qblora_pl.quantization.calibration.quantize_model_gptq", quantize_recording_layer_1)
    backend = GroupwiseInt(bits=3, group_size=32, init="gptq", calibration_records=4, calibration_seq_len=32,
                           compute_dtype="float32")
    model = backend.load(MODEL, calibration=embedded_data.calibration_set)
    first = embedded_data.calibration_set(4, 32).sequences[0]
    # During calibration layer 1's q_proj saw sequence 0 first (the grouping probe), then in the Hessian pass.
    final = _q_proj_1_input(model, first)
    assert isinstance(model.model.layers[0].self_attn.q_proj, GroupwiseIntLinear)
    torch.testing.assert_close(layer_1_inputs[0], final, rtol=0, atol=1e-6)
    # ... which differs from what the dense layer 0 would have given it.
    dense = GroupwiseInt(bits=8, group_size=32, compute_dtype="float32")._load_float(MODEL, torch.float32)
    assert (_q_proj_1_input(dense, first) - final).abs().max() > 1e-4


# --------------------------------------------------------------------------- the backend
def test_backend_arguments_are_validated_by_name():
    with pytest.raises(ValueError, match=r"init='awq' must be one of \['rtn', 'mse', 'gptq'\]"):
        GroupwiseInt(init="awq")
    with pytest.raises(ValueError, match="calibration_records=0 must be an integer >= 1"):
        GroupwiseInt(init="gptq", calibration_records=0)
    with pytest.raises(ValueError, match="calibration_seq_len=-5"):
        GroupwiseInt(init="gptq", calibration_seq_len=-5)


def test_rtn_records_what_older_checkpoints_recorded_and_calibrated_inits_record_themselves():
    assert GroupwiseInt().init_args() == {"bits": 4, "group_size": 32, "scale_dtype": "float16", "compute_dtype": "auto"}
    assert GroupwiseInt(init="mse").init_args()["init"] == "mse"
    gptq = GroupwiseInt(init="gptq", calibration_records=64).init_args()
    assert gptq["init"] == "gptq" and gptq["calibration_records"] == 64 and gptq["calibration_seq_len"] == 512


def test_gptq_without_calibration_data_says_where_it_comes_from(cache):
    with pytest.raises(ValueError, match=r"calibrates on the run's training examples, and none were given"):
        GroupwiseInt(bits=3, init="gptq").load(MODEL)


def test_gptq_base_is_cached_and_found_by_its_recorded_digest(embedded_data, cache, monkeypatch):
    backend = GroupwiseInt(bits=3, group_size=32, init="gptq", calibration_records=4, calibration_seq_len=32,
                           compute_dtype="float32")
    first = backend.load(MODEL, calibration=embedded_data.calibration_set)
    digest = backend.describe()["calibration_digest"]
    assert digest == embedded_data.calibration_set(4, 32).digest
    assert len(list((cache / "bases").iterdir())) == 1

    def no_calibration(*_args, **_kwargs):
        raise AssertionError("the cached base should have been used")

    monkeypatch.setattr("qblora_pl.quantization.calibration.quantize_model_gptq", no_calibration)
    # An export: the checkpoint's digest finds the entry without reading any data.
    again = GroupwiseInt(bits=3, group_size=32, init="gptq", calibration_records=4, calibration_seq_len=32,
                         compute_dtype="float32")
    again.expect_calibration(digest)
    second = again.load(MODEL)
    for name, layer in first.named_modules():
        if isinstance(layer, GroupwiseIntLinear):
            other = second.get_submodule(name)
            assert torch.equal(layer.packed_codes, other.packed_codes)
            assert torch.equal(layer.scales, other.scales) and torch.equal(layer.offsets, other.offsets)
    # Another calibration set is another base: refused, naming both.
    other = GroupwiseInt(bits=3, group_size=32, init="gptq", calibration_records=4, calibration_seq_len=32)
    other.expect_calibration("0123456789abcdef")
    with pytest.raises(ValueError, match=r"calibrated on tokens with digest 0123456789abcdef, but this run's "
                                         r"calibration set is 4 sequences"):
        other.load(MODEL, calibration=embedded_data.calibration_set)


def test_mse_base_is_better_than_rtn_and_cached(cache):
    rtn = GroupwiseInt(bits=2, group_size=32, compute_dtype="float32").load(MODEL)
    mse = GroupwiseInt(bits=2, group_size=32, init="mse", compute_dtype="float32").load(MODEL)
    dense = GroupwiseInt()._load_float(MODEL, torch.float32)
    name = "model.layers.0.mlp.gate_proj"
    weight = dense.get_submodule(name).weight.detach()

    def error(model):
        return float(((model.get_submodule(name).dequantize() - weight) ** 2).sum())

    assert error(mse) < 0.9 * error(rtn)
    assert len(list((cache / "bases").iterdir())) == 1


def test_a_checkpoint_on_another_base_init_is_refused_naming_both_values():
    saved = {"strategy": "s", "quantization": GroupwiseInt(bits=3, init="gptq").describe(), "layers": {}}
    current = {"strategy": "s", "quantization": GroupwiseInt(bits=3, init="mse").describe(), "layers": {}}
    with pytest.raises(AdapterCheckpointMismatch, match=r"init: checkpoint 'gptq', model 'mse'"):
        check_adapter_spec(saved, current, set(), set())
