"""bench/accuracy.py's users'-pipeline rows (--library-gptq) and calibrated bases (--base-init)."""

from __future__ import annotations

import pytest

from bench import accuracy_lib as accuracy
from bench import library_pipeline


def test_library_rows_are_planned_only_when_asked_and_count_for_done():
    args = accuracy.parse_args(["--bits", "3", "2", "--group-sizes", "32"])
    assert accuracy.missing_library_formats(args, "qlora", 0, {}) == []
    args = accuracy.parse_args(["--bits", "3", "2", "--group-sizes", "32", "--library-gptq"])
    stored = {accuracy.run_key("qlora", 0, None, None): {}, accuracy.run_key("qlora+ptq", 0, 3, 32): {},
              accuracy.run_key("qlora+ptq", 0, 2, 32): {}, accuracy.run_key("qlora+libgptq", 0, 3, 32): {}}
    assert accuracy.missing_library_formats(args, "qlora", 0, stored) == [(2, 32)]
    assert not accuracy.is_done(args, ("qlora", 0, None, None, False), stored)
    stored[accuracy.run_key("qlora+libgptq", 0, 2, 32)] = {}
    assert accuracy.is_done(args, ("qlora", 0, None, None, False), stored)
    assert accuracy.method_name("qlora+libgptq") == "QLoRA + GPTQ (llm-compressor)"
    # Choosing rows is not a setting of the results file: old files accept --library-gptq.
    assert "library_gptq" not in accuracy.run_settings(args)


def test_base_init_is_a_setting_of_the_results_file_only_when_not_rtn():
    assert "base_init" not in accuracy.run_settings(accuracy.parse_args([]))
    settings = accuracy.run_settings(accuracy.parse_args(["--base-init", "gptq", "--calibration-records", "64"]))
    assert settings["base_init"] == "gptq" and settings["calibration_records"] == 64
    quantization, _ = accuracy.build("qablora", 8, 3, 32, base=accuracy.base_args(accuracy.parse_args(
        ["--base-init", "mse"])))
    assert quantization.init == "mse"


def test_missing_library_environment_names_the_setup_command(monkeypatch, tmp_path):
    monkeypatch.setattr(library_pipeline, "VENV_PYTHON", tmp_path / "nope" / "bin" / "python")
    with pytest.raises(SystemExit, match="scripts/setup_library_gptq_venv.sh"):
        library_pipeline.check_library_venv()
