"""Exports fail cleanly (atomic writes, non-finite merges) and name every lossy fallback."""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

import pytest
import torch

import qblora_pl.export.native as native_module
from qblora_pl.adapters.base import AdaptedLinear
from qblora_pl.export import ExportFallbackWarning, export_module, load_native
from qblora_pl.export.exporter import ExportDestinationError, ExportVerificationError
from tests.export.conftest import adapted_module

gguf = pytest.importorskip("gguf")


def _quiet(_: str) -> None:
    pass


def _assert_unmerged(module):
    assert not any(m.merged for m in module.model.modules() if isinstance(m, AdaptedLinear))


def _tree(path):
    """Every file under ``path`` with its bytes: an export's whole content."""
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


RUN = {"id": "run-a"}


def test_failed_write_leaves_no_partial_export_and_keeps_the_previous_one(qablora_module, tmp_path, monkeypatch):
    out = tmp_path / "exports"
    export_module(qablora_module, out, formats=["native"], verify=False, run=RUN, log=_quiet)
    previous = _tree(out)

    def broken_save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"half a safetensors file")
        raise OSError("disk full (injected)")

    monkeypatch.setattr(native_module, "save_file", broken_save_file)
    with pytest.raises(OSError, match="disk full"):
        export_module(qablora_module, out, formats=["native"], verify=False, run=RUN, log=_quiet)
    _assert_unmerged(qablora_module)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exports"]  # no staging leftovers
    assert _tree(out) == previous


def test_a_failing_format_leaves_the_previous_export_whole(qablora_module, tmp_path, monkeypatch):
    """native and GGUF written, then hf fails: neither new file may appear beside the old report."""
    import qblora_pl.export.formats.hf as hf_format

    out = tmp_path / "exports"
    export_module(qablora_module, out, formats=["native", "gguf", "hf"], verify=False, run=RUN, log=_quiet)
    previous = _tree(out)
    written = []

    def broken_hf(*args, **kwargs):
        written.extend(p.name for p in Path(args[1]).parent.iterdir())
        raise OSError("hf writer failed (injected)")

    monkeypatch.setattr(hf_format, "write_hf_dense", broken_hf)
    with torch.no_grad():  # a different model, so a mixed export would show
        next(p for p in qablora_module.parameters() if p.requires_grad).add_(0.5)
    try:
        with pytest.raises(OSError, match="hf writer failed"):
            export_module(qablora_module, out, formats=["native", "gguf", "hf"], verify=False, run=RUN, log=_quiet)
    finally:
        with torch.no_grad():
            next(p for p in qablora_module.parameters() if p.requires_grad).sub_(0.5)
    assert {"native", "model.gguf"} <= set(written), "the failure must come after other formats were written"
    assert _tree(out) == previous
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exports"]


def test_another_runs_export_is_not_replaced(qablora_module, tmp_path):
    out = tmp_path / "exports"
    export_module(qablora_module, out, formats=["native"], verify=False, run={"id": "first", "log_dir": "runs/v0"},
                  log=_quiet)
    before = _tree(out)
    with pytest.raises(ExportDestinationError, match=r"holds the export of another run \(id=first, log_dir=runs/v0\)"):
        export_module(qablora_module, out, formats=["native"], verify=False, run={"id": "second"}, log=_quiet)
    assert _tree(out) == before
    # the same run may re-export; another run only with overwrite
    export_module(qablora_module, out, formats=["native"], verify=False, run={"id": "first"}, log=_quiet)
    report = export_module(qablora_module, out, formats=["native"], verify=False, run={"id": "second"},
                           overwrite=True, log=_quiet)
    assert report["run"]["id"] == "second"
    assert json.loads((out / "export_report.json").read_text())["run"]["id"] == "second"


def test_a_directory_that_is_not_an_export_is_never_replaced(qablora_module, tmp_path):
    (tmp_path / "notes.txt").write_text("my work")
    with pytest.raises(ExportDestinationError, match="non-empty directory without export_report.json"):
        export_module(qablora_module, tmp_path, formats=["native"], verify=False, overwrite=True, log=_quiet)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_exports_respect_the_umask(qablora_module, tmp_path, umask, file_mode, dir_mode):
    old = os.umask(umask)
    try:
        export_module(qablora_module, tmp_path / "exports", formats=["native", "gguf", "hf"], verify=False, log=_quiet)
    finally:
        os.umask(old)
    paths = [tmp_path / "exports", *(tmp_path / "exports").rglob("*")]
    modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode) for p in paths}
    assert {m for p, m in modes.items() if Path(tmp_path / p).is_dir()} == {dir_mode}, modes
    assert {m for p, m in modes.items() if Path(tmp_path / p).is_file()} == {file_mode}, modes


def test_non_finite_logits_fail_the_export_and_write_nothing(tiny_model_dir, tmp_path):
    """Finite weights whose forward overflows (a final norm of 1e38): logits inf / NaN."""
    module = adapted_module(tiny_model_dir, "qablora")
    with torch.no_grad():
        module.model.model.norm.weight.fill_(1e38)
    with pytest.raises(ExportVerificationError, match=r"in-memory merged model produced \d+ non-finite logits"):
        export_module(module, tmp_path / "out", formats=["native"], log=_quiet)
    assert list(tmp_path.iterdir()) == []
    _assert_unmerged(module)


def test_a_poisoned_file_fails_verification(qablora_module, tmp_path, monkeypatch):
    """The in-memory model is fine but the file, as its runtime loads it, gives NaN: refused."""
    import qblora_pl.export.formats.native as native_format

    real = native_format.load_native

    def poisoned(path):
        model = real(path)
        with torch.no_grad():
            model.model.norm.weight.fill_(float("nan"))
        return model

    monkeypatch.setattr(native_format, "load_native", poisoned)
    with pytest.raises(ExportVerificationError, match="the native export as loaded by"):
        export_module(qablora_module, tmp_path / "out", formats=["native"], log=_quiet)
    assert list(tmp_path.iterdir()) == []


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
    assert report["formats"]["gguf"]["layer_types"] == {"F16": 15}  # 14 fallbacks + the untied head (compact F16)
    # Round-to-nearest INT4 moves the logits far more than fp16 rounding does.
    native_diff = report["formats"]["native"]["verification"]["max_abs_logit_diff"]
    assert native_diff > 10 * report["formats"]["gguf"]["verification"]["max_abs_logit_diff"] > 0


@pytest.mark.parametrize("fallback, expected_type", [("f16", "F16"), ("requantize_q4_1", "Q4_1")])
def test_int8_gguf_uses_the_named_fallback(gqa_model_dir, tmp_path, fallback, expected_type):
    module = adapted_module(gqa_model_dir, "qablora", bits=8)  # INT2/3/4 are exact Q4_1; INT8 codes do not fit
    with pytest.warns(ExportFallbackWarning, match=rf"'{fallback}' fallback \(INT8 g32 -> {expected_type}: "):
        report = export_module(module, tmp_path, formats=["gguf"], gguf_fallback=fallback, log=_quiet)
    info = report["formats"]["gguf"]
    assert len(info["fallback_layers"]) == 14
    assert all(info["layers"][name]["gguf_type"] == expected_type for name in info["fallback_layers"])
    reader = gguf.GGUFReader(str(tmp_path / "model.gguf"))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == expected_type
    diff = info["verification"]["max_abs_logit_diff"]
    assert 0 < diff < (0.05 if fallback == "f16" else 5.0)


def test_unknown_format_is_named(qablora_module, tmp_path):
    with pytest.raises(ValueError, match=r"\['onnx'\] are not among"):
        export_module(qablora_module, tmp_path, formats=["native", "onnx"], log=_quiet)


# ---------------------------------------------------------------- interrupted exports (issue 35)
_ATOMIC = Path(__file__).resolve().parents[2] / "qblora_pl" / "atomic.py"

# A writer process using qblora_pl/atomic.py (loaded by path: no torch import, starts in ms).
_WRITER = """
import importlib.util, os, shutil, signal, sys, time
spec = importlib.util.spec_from_file_location("atomic", sys.argv[1])
atomic = importlib.util.module_from_spec(spec)
spec.loader.exec_module(atomic)
final, how = sys.argv[2], sys.argv[3]
if how == "killed_after_swap":  # the new export is in place, the old one not yet deleted
    shutil.rmtree = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
if how == "file":
    with atomic.atomic_file(final) as tmp:
        tmp.write_bytes(b"half a file")
        os.kill(os.getpid(), signal.SIGKILL)
with atomic.atomic_directory(final) as tmp:
    (tmp / "weights.bin").write_bytes(bytes(4096))
    (tmp / "export_report.json").write_text('{"run": {"id": "run-a"}}')  # the same run as the tests'
    if how == "live":
        print("writing", flush=True)
        time.sleep(120)
    elif how == "killed":
        os.kill(os.getpid(), signal.SIGKILL)
"""


def _writer(final: Path, how: str, **popen):
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-c", _WRITER, str(_ATOMIC), str(final), how], text=True, **popen)


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("how", ["killed", "killed_after_swap"])
def test_the_next_export_removes_what_a_killed_export_left(qablora_module, tmp_path, how):
    """A SIGKILLed export leaves its hidden staging (or set-aside) folder; the next export into the same
    destination removes it - and nothing else: other names are not ours."""
    out = tmp_path / "exports"
    export_module(qablora_module, out, formats=["native"], verify=False, run=RUN, log=_quiet)
    assert _writer(out, how).wait(timeout=60) == -9
    assert _hidden(tmp_path), "the killed writer left nothing behind: the test would prove nothing"
    foreign = [".exports.keep.tmp", ".exports_other.1-2.tmp", ".exports.old"]
    for name in foreign:
        (tmp_path / name).mkdir()
    export_module(qablora_module, out, formats=["native"], verify=False, run=RUN, log=_quiet)
    assert _hidden(tmp_path) == sorted(foreign)
    assert load_native(out / "native") is not None


def test_the_next_export_keeps_a_running_exports_staging_folder(qablora_module, tmp_path):
    out = tmp_path / "exports"
    import subprocess

    live = _writer(out, "live", stdout=subprocess.PIPE)
    try:
        assert live.stdout.readline().strip() == "writing"
        staging = _hidden(tmp_path)
        assert len(staging) == 1 and staging[0].endswith(".tmp")
        export_module(qablora_module, out, formats=["native"], verify=False, run=RUN, log=_quiet)
        assert _hidden(tmp_path) == staging  # another process is still writing it
    finally:
        live.kill()
        live.wait(timeout=60)
    export_module(qablora_module, out, formats=["native"], verify=False, run=RUN, log=_quiet)
    assert _hidden(tmp_path) == []  # its writer is gone: stale


def test_the_next_file_write_removes_a_killed_writes_temporary_file(tmp_path):
    from qblora_pl.atomic import atomic_file

    final = tmp_path / "model.gguf"
    assert _writer(final, "file").wait(timeout=60) == -9
    assert len(_hidden(tmp_path)) == 1
    with atomic_file(final) as tmp:
        tmp.write_bytes(b"whole file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]


def test_ctrl_c_during_an_export_leaves_no_staging_folder(qablora_module, tmp_path, monkeypatch):
    out = tmp_path / "exports"
    export_module(qablora_module, out, formats=["native"], verify=False, run=RUN, log=_quiet)
    previous = _tree(out)

    def interrupted_save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a safetensors file")
        raise KeyboardInterrupt

    monkeypatch.setattr(native_module, "save_file", interrupted_save_file)
    with pytest.raises(KeyboardInterrupt):
        export_module(qablora_module, out, formats=["native"], verify=False, run=RUN, log=_quiet)
    _assert_unmerged(qablora_module)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exports"]
    assert _tree(out) == previous
