"""The callbacks ship inside the package (``qblora_pl.callbacks``), and checkpoints are ``AdapterCheckpoint``'s."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.run_safety.test_run_safety import REPO, main_py, run_config


def test_callbacks_import_from_the_package_and_the_folder_is_not_a_top_level_package():
    import qblora_pl.callbacks as package
    from qblora_pl.callbacks import AdapterCheckpoint, MergeExport
    from qblora_pl.callbacks.checkpoint import AdapterCheckpoint as same

    assert AdapterCheckpoint is same and MergeExport.__module__ == "qblora_pl.callbacks.merge_export"
    assert set(package.__all__) >= {"AdapterCheckpoint", "EvaluationSuite", "MergeExport", "QATSchedule",
                                    "RankBalanceDiagnostics", "StepProgressBar"}
    # From the checkout's root (where `callbacks/` is a folder on sys.path) the old name is refused with the new one.
    done = subprocess.run([sys.executable, "-c", "import callbacks"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode != 0 and "qblora_pl.callbacks" in done.stderr, done.stderr[-2000:]


def test_a_plain_model_checkpoint_is_refused_naming_the_replacement(tiny_model_dir, tiny_data_dir, tmp_path):
    config = run_config(tiny_model_dir, tiny_data_dir, max_steps=2)
    config["trainer"]["callbacks"][0]["class_path"] = "lightning.pytorch.callbacks.ModelCheckpoint"
    done = main_py(tmp_path, "fit", config=config)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "trainer.callbacks[0]" in done.stderr and "qblora_pl.callbacks.AdapterCheckpoint" in done.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.ckpt"))


@pytest.mark.parametrize("short_name", ["ModelCheckpoint"])
def test_the_short_class_name_is_refused_too(tiny_model_dir, tiny_data_dir, tmp_path, short_name):
    config = run_config(tiny_model_dir, tiny_data_dir, max_steps=2)
    config["trainer"]["callbacks"][0]["class_path"] = short_name
    done = main_py(tmp_path, "fit", config=config)
    assert done.returncode == 2 and "qblora_pl.callbacks.AdapterCheckpoint" in done.stderr, done.stderr[-3000:]


def test_a_run_naming_no_checkpoint_callback_gets_adapter_checkpoint(tiny_model_dir, tiny_data_dir, tmp_path):
    config = run_config(tiny_model_dir, tiny_data_dir, max_steps=4)  # Lightning's default saves after validation
    config["trainer"]["callbacks"] = [c for c in config["trainer"]["callbacks"] if "Checkpoint" not in c["class_path"]]
    done = main_py(tmp_path, "fit", config=config)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "names no checkpoint callback: using qblora_pl.callbacks.AdapterCheckpoint()" in done.stdout + done.stderr
    (checkpoint,) = (tmp_path / "runs").rglob("*.ckpt")
    state = torch.load(checkpoint, weights_only=True)
    assert any(key.startswith("ModelCheckpoint{") for key in state["callbacks"])  # Lightning's state key
    assert state["state_dict"] and all(".adapter." in name for name in state["state_dict"])  # adapters only: no frozen base
