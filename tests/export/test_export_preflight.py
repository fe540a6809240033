"""What an export needs is checked before the costly work: each format's optional packages and a
writable destination (issue 35). The fit and ``main.py export`` paths are in test_merge_export_callback.py."""

from __future__ import annotations

import re
import sys
import tempfile

import pytest

from qblora_pl.export.preflight import (
    ExportDestinationNotWritable,
    MissingExportDependency,
    check_export_requirements,
    check_writable_destination,
)


def test_mlx_verification_needs_mlx_lm_and_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlx_lm", None)  # absent, also where it is installed
    with pytest.raises(MissingExportDependency) as caught:
        check_export_requirements(["native", "gguf", "mlx"], verify=True)
    message = str(caught.value)
    assert message.startswith("export format 'mlx' needs mlx-lm to verify the export (import mlx_lm failed: ")
    assert message.count("export format") == 1
    assert 'pip install -e ".[mlx]"' in message and "--no_verify" in message and "verify: false" in message
    assert "'gguf'" not in message and "'native'" not in message  # only what is missing is named
    assert isinstance(caught.value, ImportError)


def test_formats_need_only_what_their_writer_and_verification_import(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlx_lm", None)
    monkeypatch.setitem(sys.modules, "mlx", None)
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # llama.cpp is a test / bench client, not the exporter's
    check_export_requirements(["native", "gguf", "hf"], verify=True)
    check_export_requirements(["native", "mlx"], verify=False)  # the MLX writer needs torch and numpy only
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(MissingExportDependency, match=r"^export format 'gguf' needs gguf to write the export"):
        check_export_requirements(["gguf"], verify=False)


def test_a_folder_under_a_file_is_not_writable(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    target = blocker / "deeper" / "exports"
    with pytest.raises(ExportDestinationNotWritable, match=re.escape(
            f"MergeExport output_dir '{target}' is not writable: '{blocker}' is not a folder")):
        check_writable_destination(target, "MergeExport output_dir")
    with pytest.raises(ExportDestinationNotWritable, match=re.escape(f"--output_dir '{blocker}' is not writable")):
        check_writable_destination(blocker, "--output_dir")
    check_writable_destination(tmp_path / "new" / "exports", "--output_dir")  # made when the export is written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # the check itself writes nothing


def test_a_read_only_folder_is_found_by_trying_to_write_not_by_permission_bits(tmp_path, monkeypatch):
    """Root passes os.access everywhere and a read-only mount keeps its mode bits: only a write tells."""
    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied", kwargs.get("dir"))

    monkeypatch.setattr(tempfile, "TemporaryFile", refused)
    with pytest.raises(ExportDestinationNotWritable, match=re.escape(
            f"--output_dir '{tmp_path / 'exports'}' is not writable: cannot create a file in '{tmp_path}' "
            "(Permission denied); name a folder you can write to")):
        check_writable_destination(tmp_path / "exports", "--output_dir")
    assert isinstance(ExportDestinationNotWritable("x"), PermissionError)
