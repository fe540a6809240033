"""The export-format registry: a format added through the public interface is written, verified and
reported like a built-in one; every format's ``check`` refuses, before training, what it cannot write.

The toy format is docs/extending.md's recipe (tests/extending/recipes.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
import pytest
from qblora_pl.export import export_module
from qblora_pl.export.formats import (
    ExportOptions,
    ExportPlan,
    UnsupportedExportFormat,
    check_formats,
    check_model_support,
    register_export_format,
    registered_formats,
    unregister_export_format,
)
from tests.extending.recipes import TorchStateDictFormat
from tests.run_safety.test_run_safety import main_py, run_config


@pytest.fixture
def torch_state_dict_format():
    register_export_format(TorchStateDictFormat)
    yield TorchStateDictFormat.name
    unregister_export_format(TorchStateDictFormat.name)


def test_a_registered_format_is_written_verified_and_reported(qablora_module, tmp_path, torch_state_dict_format):
    assert torch_state_dict_format in registered_formats()
    report = export_module(qablora_module, tmp_path / "out", formats=["native", torch_state_dict_format],
                           format_options={torch_state_dict_format: {"dtype": "float32"}}, log=lambda _: None)
    ours = report["formats"][torch_state_dict_format]
    assert ours["dtype"] == "torch.float32" and Path(ours["path"]) == tmp_path / "out" / "torch"
    assert ours["verification"]["max_abs_logit_diff"] < 1e-4  # dense float32: the merged model itself
    assert ours["verification"]["argmax_agreement"] == 1.0
    saved = json.loads((tmp_path / "out" / "export_report.json").read_text())
    assert set(saved["formats"]) == {"native", torch_state_dict_format}


def test_format_options_reach_the_format(qablora_module, tmp_path, torch_state_dict_format):
    report = export_module(qablora_module, tmp_path / "out", formats=[torch_state_dict_format], verify=False,
                           format_options={torch_state_dict_format: {"dtype": "bfloat16"}}, log=lambda _: None)
    assert report["formats"][torch_state_dict_format]["dtype"] == "torch.bfloat16"


def test_names_are_checked_against_the_registry(torch_state_dict_format):
    assert check_formats(["native", torch_state_dict_format, "native"]) == ["native", torch_state_dict_format]
    with pytest.raises(ValueError, match=r"\['tflite'\] are not among \['native', 'gguf', 'hf', 'mlx', "
                                         r"'compressed-tensors', 'torch-state-dict'\]"):
        check_formats(["native", "tflite"])

    class Impostor(TorchStateDictFormat):
        pass

    with pytest.raises(ValueError, match="'torch-state-dict' is already registered"):
        register_export_format(Impostor)


def _plan(model_type="llama", low_bit=(4, 32), merges=True) -> ExportPlan:
    from transformers import AutoConfig

    return ExportPlan(model_config=AutoConfig.for_model(model_type), low_bit=low_bit, merges_into_offsets=merges)


@pytest.mark.parametrize(("formats", "plan", "message"), [
    (["native", "gguf"], _plan("mistral"), r"'gguf' writes model_type 'llama' only, and this model is 'mistral'"),
    (["mlx"], _plan("qwen2"), r"'mlx' writes model_type 'llama' only"),
    (["mlx"], _plan(low_bit=(4, 16)), r"'mlx' stores INT4 g16 codes only as bits"),
    (["compressed-tensors"], _plan(low_bit=(5, 32)), r"not INT5 g32 \(the base's bits / group_size\)"),
    (["compressed-tensors"], _plan(low_bit=(4, 256), merges=False), r"INT4 g256 \(native_bits / native_group_size\)"),
])
def test_each_format_refuses_what_it_cannot_write(formats, plan, message):
    with pytest.raises(UnsupportedExportFormat, match=message):
        check_model_support(formats, plan, ExportOptions())


def test_what_the_formats_write_passes_their_checks():
    check_model_support(["native", "gguf", "hf", "mlx", "compressed-tensors"], _plan(low_bit=(2, 64)), ExportOptions())
    check_model_support(["native", "hf", "compressed-tensors"], _plan("mistral", merges=False), ExportOptions())
    mlx_dense = _plan(low_bit=(4, 16), merges=False)  # dense merges stay dense in MLX (exact): any group size
    check_model_support(["mlx"], mlx_dense, ExportOptions())


@pytest.fixture(scope="module")
def mistral_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny fixture's tokenizer on a 1-layer Mistral: an architecture the GGUF writer does not map."""
    from transformers import LlamaConfig, MistralConfig, MistralForCausalLM

    directory = tmp_path_factory.mktemp("tiny-mistral")
    for path in Path(tiny_model_dir).iterdir():
        if path.name.startswith("tokenizer") or path.name == "special_tokens_map.json":
            shutil.copy2(path, directory / path.name)
    llama = LlamaConfig.from_pretrained(tiny_model_dir)
    config = MistralConfig(vocab_size=llama.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=4, bos_token_id=llama.bos_token_id,
                           eos_token_id=llama.eos_token_id)
    MistralForCausalLM(config).save_pretrained(directory)
    return directory


def test_fit_with_gguf_on_a_non_llama_model_stops_before_training(mistral_model_dir, tiny_data_dir, tmp_path):
    export = {"class_path": "qblora_pl.callbacks.MergeExport", "init_args": {"formats": ["native", "gguf"]}}
    done = main_py(tmp_path, "fit", config=run_config(mistral_model_dir, tiny_data_dir, callbacks=[export]))
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("main.py: error:") and "'gguf' writes model_type 'llama' only" in last, last
    assert "this model is 'mistral'" in last and "drop 'gguf' from formats" in last
    assert not list(tmp_path.rglob("*.ckpt")) and not list(tmp_path.rglob("exports"))


def test_the_checkpoint_export_checks_formats_with_the_options_it_will_export_with():
    """export_from_checkpoint's early format check gets the run's options, not defaults."""
    from qblora_pl.export.exporter import options_from
    from qblora_pl.export.formats import ExportOptions

    kwargs = {"native_bits": 3, "native_group_size": 64, "round_zero_points": True, "verify": False,
              "format_options": {"torch-state-dict": {"dtype": "float16"}}, "gguf_fallback": None}
    assert options_from(kwargs) == ExportOptions(native_bits=3, native_group_size=64, round_zero_points=True,
                                                 format_options={"torch-state-dict": {"dtype": "float16"}})
    assert options_from({}) == ExportOptions()
