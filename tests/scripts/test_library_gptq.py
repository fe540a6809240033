"""scripts/library_gptq.py's argument and input checks, which run without llm-compressor.

The GPTQ itself runs only in .venvs/llmcompressor (scripts/setup_library_gptq_venv.sh); these tests
import the script from the project's python, where llmcompressor is absent, and check that bad values
are refused with their names before anything heavy is imported."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "library_gptq.py"


@pytest.fixture(scope="module")
def lg():
    spec = importlib.util.spec_from_file_location("library_gptq", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("library_gptq", mod)  # dataclasses look their module up while it executes
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def model_dir(tmp_path) -> Path:
    """A stand-in HF folder: config, tokenizer file, and SmolLM2-like widths (576 / 1536) in safetensors."""
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"vocab_size": 100, "max_position_embeddings": 64, "model_type": "llama"}))
    (d / "tokenizer.json").write_text("{}")
    save_file(
        {
            "model.embed_tokens.weight": torch.zeros(100, 576),
            "model.layers.0.self_attn.q_proj.weight": torch.zeros(4, 576),
            "model.layers.0.mlp.down_proj.weight": torch.zeros(4, 1536),
            "model.layers.0.input_layernorm.weight": torch.zeros(576),
            "lm_head.weight": torch.zeros(100, 576),
        },
        str(d / "model.safetensors"),
    )
    return d


@pytest.fixture
def calib(tmp_path) -> Path:
    p = tmp_path / "calib.json"
    p.write_text(json.dumps({"sequences": [[1, 2, 3], [4, 5], [6, 7, 8, 9]]}))
    return p


def _args(lg, model_dir, calib, out, *extra):
    return lg.parse_args(
        ["--model", str(model_dir), "--calibration", str(calib), "--bits", "3", "--group-size", "32", "--output", str(out), *extra]
    )


def test_valid_arguments_make_a_plan_without_llmcompressor(lg, model_dir, calib, tmp_path):
    plan = lg.validate(_args(lg, model_dir, calib, tmp_path / "out"))
    assert (plan.bits, plan.group_size, plan.dampening_frac) == (3, 32, 0.01)
    assert len(plan.sequences) == 3 and plan.num_tokens == 9 and plan.max_seq_length == 4
    # embeddings, lm_head (ignored) and 1-D norms are not GPTQ's linear layers
    assert plan.linear_in_features == {"model.layers.0.self_attn.q_proj": 576, "model.layers.0.mlp.down_proj": 1536}
    cfg = lg.recipe_config(plan)
    weights = cfg["config_groups"]["group_0"]["weights"]
    assert weights["actorder"] is None and cfg["actorder"] is None and cfg["ignore"] == ["lm_head"]
    assert weights["strategy"] == "group" and weights["symmetric"] is False
    assert "llmcompressor" not in sys.modules


@pytest.mark.parametrize("bits", ["1", "5", "16"])
def test_bits_outside_the_allowed_set_are_refused(lg, model_dir, calib, tmp_path, bits):
    args = _args(lg, model_dir, calib, tmp_path / "out")
    args.bits = int(bits)
    with pytest.raises(lg.UsageError, match=rf"--bits {bits}: must be one of 2, 3, 4, 8"):
        lg.validate(args)


def test_group_size_that_does_not_divide_a_layer_is_refused_with_the_widths(lg, model_dir, calib, tmp_path):
    args = _args(lg, model_dir, calib, tmp_path / "out")
    args.group_size = 128
    with pytest.raises(lg.UsageError, match=r"--group-size 128 does not divide .*576.*\[8, 16, 32, 64\]"):
        lg.validate(args)
    args.group_size = 0
    with pytest.raises(lg.UsageError, match="--group-size 0"):
        lg.validate(args)


def test_missing_model_dir_and_non_model_dirs_are_named(lg, calib, tmp_path):
    with pytest.raises(lg.UsageError, match=r"--model .*nope: no such directory"):
        lg.validate(_args(lg, tmp_path / "nope", calib, tmp_path / "out"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(lg.UsageError, match="no config.json"):
        lg.validate(_args(lg, tmp_path / "empty", calib, tmp_path / "out"))


def test_an_already_quantized_model_is_refused(lg, model_dir, calib, tmp_path):
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "compressed-tensors"}
    (model_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(lg.UsageError, match="already quantized"):
        lg.validate(_args(lg, model_dir, calib, tmp_path / "out"))


@pytest.mark.parametrize(
    "content, message",
    [
        ("[[1, 2]]", r'expected an object \{"sequences"'),
        ('{"seqs": [[1]]}', r"with keys \['seqs'\]"),
        ('{"sequences": []}', "non-empty list"),
        ('{"sequences": [[1, 2], []]}', "sequence 1 is not a non-empty list"),
        ('{"sequences": [[1, "a"]]}', r"sequence 0, position 1: 'a' is not a token id"),
        ('{"sequences": [[1, true]]}', r"position 1: True is not a token id"),
        ('{"sequences": [[1, -3]]}', r"position 1: -3 is not a token id"),
        ('{"sequences": [[1, 100]]}', r"token id 100 >= the model's vocab_size 100"),
        ('{"sequences": [' + json.dumps(list(range(65))) + "]}", "65 tokens, more than the model's max_position_embeddings 64"),
        ("not json", "not JSON"),
    ],
)
def test_calibration_files_not_in_the_expected_shape_are_refused(lg, model_dir, tmp_path, content, message):
    p = tmp_path / "bad.json"
    p.write_text(content)
    with pytest.raises(lg.UsageError, match=message):
        lg.validate(_args(lg, model_dir, p, tmp_path / "out"))


def test_dampening_and_a_non_empty_output(lg, model_dir, calib, tmp_path):
    with pytest.raises(lg.UsageError, match="--dampening-frac 0.0"):
        lg.validate(_args(lg, model_dir, calib, tmp_path / "out", "--dampening-frac", "0"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("")
    with pytest.raises(lg.UsageError, match="not empty .*--overwrite"):
        lg.validate(_args(lg, model_dir, calib, out))
    assert lg.validate(_args(lg, model_dir, calib, out, "--overwrite")).overwrite


def test_main_exits_2_with_the_error_and_names_the_venv_when_llmcompressor_is_absent(lg, model_dir, calib, tmp_path, capsys, monkeypatch):
    base = ["--model", str(model_dir), "--calibration", str(calib), "--group-size", "32", "--output", str(tmp_path / "o")]
    assert lg.main([*base, "--bits", "7"]) == 2
    assert "library_gptq.py: error: --bits 7" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "llmcompressor", None)  # import llmcompressor -> ImportError
    assert lg.main([*base, "--bits", "3"]) == 2
    err = capsys.readouterr().err
    assert "llmcompressor is not importable" in err and ".venvs/llmcompressor/bin/python" in err
    assert not (tmp_path / "o").exists()
