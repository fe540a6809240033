"""Exports fail cleanly (atomic writes, non-finite merges) and name every lossy fallback."""

from __future__ import annotations

import json
import math

import pytest
import torch

import qblora_pl.export.native as native_module
from qblora_pl.adapters.base import AdaptedLinear
from qblora_pl.export import ExportFallbackWarning, export_module, load_native
from tests.export.conftest import adapted_module

gguf = pytest.importorskip("gguf")


def _quiet(_: str) -> None:
    pass


def _assert_unmerged(module):
    assert not any(m.merged for m in module.model.modules() if isinstance(m, AdaptedLinear))


def test_failed_write_leaves_no_partial_export_and_keeps_the_previous_one(qablora_module, tmp_path, monkeypatch):
    previous = tmp_path / "native"
    previous.mkdir()
    (previous / "marker.txt").write_text("earlier export")

    def broken_save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"half a safetensors file")
        raise OSError("disk full (injected)")

    monkeypatch.setattr(native_module, "save_file", broken_save_file)
    with pytest.raises(OSError, match="disk full"):
        export_module(qablora_module, tmp_path, formats=["native"], verify=False, log=_quiet)
    _assert_unmerged(qablora_module)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["native"]  # no temporary leftovers
    assert sorted(p.name for p in previous.iterdir()) == ["marker.txt"]


def test_failed_gguf_write_leaves_no_file(qablora_module, tmp_path, monkeypatch):
    def broken_write(self, *args, **kwargs):
        self.fout[0].write(b"partial tensor data")  # something is on disk when it fails
        raise OSError("device lost (injected)")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", broken_write)
    with pytest.raises(OSError, match="device lost"):
        export_module(qablora_module, tmp_path, formats=["gguf"], verify=False, log=_quiet)
    assert list(tmp_path.iterdir()) == []
    _assert_unmerged(qablora_module)


def test_non_finite_merge_aborts_naming_the_layer(tiny_model_dir, tmp_path):
    module = adapted_module(tiny_model_dir, "qablora")
    layer = module.model.get_submodule("model.layers.1.mlp.up_proj")
    with torch.no_grad():
        layer.adapter.balanced_M[0, 0] = math.inf
    with pytest.raises(FloatingPointError, match=r"model\.layers\.1\.mlp\.up_proj.*non-finite"):
        export_module(module, tmp_path / "out", log=_quiet)
    assert not (tmp_path / "out").exists()
    _assert_unmerged(module)


def test_lora_exports_say_they_requantize(tiny_model_dir, tmp_path):
    module = adapted_module(tiny_model_dir, "qlora")
    with pytest.warns(ExportFallbackWarning) as caught:
        report = export_module(module, tmp_path, formats=["native", "gguf"], log=_quiet)
    messages = [str(w.message) for w in caught]
    native_warning = next(m for m in messages if m.startswith("native export"))
    assert "re-quantized to INT4 g32 by round-to-nearest" in native_warning and "merged dense" in native_warning
    assert "Relative weight error" in native_warning
    gguf_warning = next(m for m in messages if m.startswith("GGUF export"))
    assert "'f16' fallback" in gguf_warning and "F16" in gguf_warning

    requantized = report["formats"]["native"]["requantized_layers"]
    assert len(requantized) == 14 and all(0 < e < 0.5 for e in requantized.values())
    meta = json.loads((tmp_path / "native" / "qblora_config.json").read_text())
    entry = meta["layers"]["model.layers.0.self_attn.q_proj"]
    assert entry["storage"] == "int" and entry["requantized"]["relative_weight_error"] > 0
    assert load_native(tmp_path / "native") is not None
    assert report["formats"]["gguf"]["layer_types"] == {"F16": 14, "F32": 1}
    # Round-to-nearest INT4 moves the logits far more than fp16 rounding does.
    native_diff = report["formats"]["native"]["verification"]["max_abs_logit_diff"]
    assert native_diff > 10 * report["formats"]["gguf"]["verification"]["max_abs_logit_diff"] > 0


@pytest.mark.parametrize("fallback, expected_type", [("f16", "F16"), ("requantize_q4_1", "Q4_1")])
def test_int3_gguf_uses_the_named_fallback(gqa_model_dir, tmp_path, fallback, expected_type):
    module = adapted_module(gqa_model_dir, "qablora", bits=3)
    with pytest.warns(ExportFallbackWarning, match=rf"'{fallback}' fallback \(INT3 g32 -> {expected_type}\)"):
        report = export_module(module, tmp_path, formats=["gguf"], gguf_fallback=fallback, log=_quiet)
    info = report["formats"]["gguf"]
    assert len(info["fallback_layers"]) == 14 and info["layer_types"][expected_type] == 14
    reader = gguf.GGUFReader(str(tmp_path / "model.gguf"))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == expected_type
    diff = info["verification"]["max_abs_logit_diff"]
    assert 0 < diff < (0.05 if fallback == "f16" else 5.0)


def test_unknown_format_is_named(qablora_module, tmp_path):
    with pytest.raises(ValueError, match=r"\['onnx'\] are not among"):
        export_module(qablora_module, tmp_path, formats=["native", "onnx"], log=_quiet)
