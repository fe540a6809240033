"""A GPTQ-calibrated base through the CLI: fit calibrates on the run's data and records it; a resume
on another base is refused by name; an export finds the same base (in the cache, or from the data)."""

from __future__ import annotations

import shutil

import torch

from tests.run_safety.test_run_safety import main_py, run_config


def _gptq(init: str = "gptq") -> dict:
    return {"class_path": "qblora_pl.quantization.GroupwiseInt",
            "init_args": {"bits": 3, "group_size": 32, "init": init, "calibration_records": 8, "calibration_seq_len": 64}}


def test_gptq_base_fit_resume_and_export(tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("QBLORA_PL_CACHE", str(cache))
    done = main_py(tmp_path, "fit", config=run_config(tiny_model_dir, tiny_data_dir, max_steps=4, quantization=_gptq()))
    assert done.returncode == 0, done.stderr[-3000:]
    log = done.stdout + done.stderr
    assert "calibrating INT3 g32 on 8 sequences" in log and "the training split of" in log
    ckpt = tmp_path / "runs" / "t" / "version_0" / "checkpoints" / "last.ckpt"
    recorded = torch.load(ckpt, map_location="cpu", weights_only=True)["adapter_spec"]["quantization"]
    assert recorded["init"] == "gptq" and recorded["calibration_records"] == 8
    assert len(recorded["calibration_digest"]) == 16
    assert len(list((cache / "bases").iterdir())) == 1

    # A resume on another base: one clean error naming the setting and both values.
    other = run_config(tiny_model_dir, tiny_data_dir, max_steps=8, quantization=_gptq("mse"))
    done = main_py(tmp_path, "fit", "--ckpt_path", str(ckpt), config=other)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "init: checkpoint 'gptq', config 'mse'" in done.stderr and "Traceback" not in done.stderr

    # The export finds the trained-on base in the cache by the recorded digest...
    done = main_py(tmp_path, "export", "--ckpt_path", str(ckpt), "--formats", "native", "--output_dir",
                   str(tmp_path / "export_cached"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "from the cache" in done.stdout + done.stderr
    # ... and, with the cache gone, calibrates again on the run's recorded training data: the same base.
    shutil.rmtree(cache)
    done = main_py(tmp_path, "export", "--ckpt_path", str(ckpt), "--formats", "native", "--output_dir",
                   str(tmp_path / "export_recalibrated"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "calibrating INT3 g32 on 8 sequences" in done.stdout + done.stderr
    from safetensors.torch import load_file

    def native_tensors(name):
        files = sorted((tmp_path / name / "native").glob("*.safetensors"))
        assert files, list((tmp_path / name).rglob("*"))
        return {k: v for f in files for k, v in load_file(str(f)).items()}

    cached, recalibrated = native_tensors("export_cached"), native_tensors("export_recalibrated")
    assert cached.keys() == recalibrated.keys()
    assert all(torch.equal(cached[k], recalibrated[k]) for k in cached)
