"""Runs and checkpoints that cannot silently go wrong (issue #15).

Each test injects one fault into a real ``python main.py fit`` / ``test`` / ``export`` run on the
tiny fixture model (seconds per run) and asserts the message or the behaviour:
``--ckpt_path`` never overrides the config silently, non-finite adapters never replace a good
checkpoint, unreadable checkpoint files are named, Ctrl-C (SIGINT) and ``kill -9`` (SIGKILL)
resume to exactly the uninterrupted run, and the dependency list covers the shipped configs.
"""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[2]


def run_config(model_dir, data_dir, *, callbacks=(), max_steps=12, dropout=0.05, **model) -> dict:
    """A small fit config on the fixture model: validation and checkpoints every 4 steps."""
    return {
        "seed_everything": 42,
        "model": {
            "model_name_or_path": str(model_dir),
            "learning_rate": 3e-3,
            "warmup_steps": 2,
            "quantization": {"class_path": "qblora_pl.quantization.GroupwiseInt", "init_args": {"bits": 4, "group_size": 32}},
            "adapter": {"class_path": "qblora_pl.adapters.QABLoRA", "init_args": {"budget_rank": 4, "dropout": dropout}},
            **model,
        },
        "data": {"data_path": str(data_dir), "batch_size": 4},
        "trainer": {
            "accelerator": "cpu",
            "max_steps": max_steps,
            "val_check_interval": 4,
            "check_val_every_n_epoch": None,
            "limit_val_batches": 1,
            "log_every_n_steps": 1,
            "num_sanity_val_steps": 0,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": "runs", "name": "t"}},
            "callbacks": [
                {
                    "class_path": "qblora_pl.callbacks.AdapterCheckpoint",
                    "init_args": {
                        "filename": "step{step:06d}-val{val/loss:.4f}",
                        "auto_insert_metric_name": False,
                        "monitor": "val/loss",
                        "save_top_k": 2,
                        "save_last": True,
                        "save_on_exception": True,
                    },
                },
                *callbacks,
            ],
        },
    }


def main_py(cwd: Path, *args: str, config: dict | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    """``python main.py ARGS`` in ``cwd`` (runs/ and exports/ land there)."""
    command = [sys.executable, str(REPO / "main.py"), *args]
    if config is not None:
        path = cwd / f"config{len(list(cwd.glob('config*.yaml')))}.yaml"
        path.write_text(yaml.safe_dump(config))
        command = [sys.executable, str(REPO / "main.py"), args[0], "--config", str(path), *args[1:]]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def checkpoints(cwd: Path, version: int) -> list[str]:
    return sorted(p.name for p in (cwd / "runs" / "t" / f"version_{version}" / "checkpoints").glob("*.ckpt"))


def adapters(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def signal_callback(step: int, name: str) -> dict:
    return {"class_path": "tests.run_safety.faults.SignalAtStep", "init_args": {"step": step, "signal_name": name}}


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tiny_data_dir, tmp_path_factory):
    """An uninterrupted 12-step run (checkpoints at 4, 8, 12): the reference for the resume tests."""
    cwd = tmp_path_factory.mktemp("reference")
    done = main_py(cwd, "fit", config=run_config(tiny_model_dir, tiny_data_dir))
    assert done.returncode == 0, done.stderr[-3000:]
    return cwd


# ---------------------------------------------------------------------------------------- item 1
def test_resume_refuses_another_method_base_or_shape(trained, tiny_model_dir, tiny_data_dir):
    cwd, last = trained, str(trained / "runs/t/version_0/checkpoints/last.ckpt")
    config = run_config(tiny_model_dir, tiny_data_dir, max_steps=14)
    for args, expected in [
        (["--model.adapter.init_args.budget_rank", "2"], r"budget_rank=4.*budget_rank=2"),
        (["--model.quantization.init_args.bits", "3"], r"bits=4.*bits=3"),
        (["--model.adapter", "qblora_pl.adapters.LoRA"], r"model.adapter=QABLoRA\(.*model.adapter=LoRA\("),
    ]:
        done = main_py(cwd, "fit", "--ckpt_path", last, *args, config=config)
        assert done.returncode == 2, done.stderr[-2000:]
        assert "main.py: error: --ckpt_path" in done.stderr and "cannot change" in done.stderr
        assert re.search(expected, done.stderr), done.stderr[-1500:]
    assert not (cwd / "runs/t/version_1").exists()  # refused before a run directory was made
    # `test` evaluates the checkpoint as trained: its adapter replaces the config's, with a warning
    done = main_py(cwd, "test", "--ckpt_path", last, "--model.adapter.init_args.budget_rank", "2",
                   "--trainer.logger", "false", config=config)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"trained with model.adapter=QABLoRA\(.*budget_rank=4.*budget_rank=2.*is replaced by it", done.stderr)


def test_resume_applies_and_logs_a_new_learning_rate(trained, tiny_model_dir, tiny_data_dir, tmp_path):
    last = trained / "runs/t/version_0/checkpoints/last.ckpt"
    config = run_config(tiny_model_dir, tiny_data_dir, max_steps=13)
    done = main_py(tmp_path, "fit", "--ckpt_path", str(last), "--model.learning_rate", "1e-3", config=config)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout + done.stderr
    assert "model.learning_rate changed from 0.003 (checkpoint) to 0.001" in out
    assert "Resuming from" in out and "at global step 12" in out
    ckpt = torch.load(tmp_path / "runs/t/version_0/checkpoints/last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 13
    assert ckpt["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(1e-3)
    assert ckpt["lr_schedulers"][0]["base_lrs"] == [pytest.approx(1e-3)]
    # nothing left to train is said, not silently accepted
    done = main_py(tmp_path, "fit", "--ckpt_path", str(last), config=run_config(tiny_model_dir, tiny_data_dir))
    assert done.returncode == 2 and "max_steps=12: nothing to train" in done.stderr


# ---------------------------------------------------------------------------------------- item 6
@pytest.mark.slow
def test_ctrl_c_then_resume_equals_the_uninterrupted_run(trained, tiny_model_dir, tiny_data_dir, tmp_path):
    """SIGINT during step 6 (dropout 0.05): checkpoint at the step boundary, resume, same run."""
    config = run_config(tiny_model_dir, tiny_data_dir, callbacks=[signal_callback(5, "SIGINT")])
    done = main_py(tmp_path, "fit", config=config)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Interrupted at global step 6" in done.stdout + done.stderr
    names = checkpoints(tmp_path, 0)
    assert names[0] == "last.ckpt" and names[1].startswith("step000004-val") and names[2] == "step000006-interrupted.ckpt"
    assert torch.load(tmp_path / "runs/t/version_0/checkpoints/last.ckpt", weights_only=True)["global_step"] == 6

    done = main_py(tmp_path, "fit", "--ckpt_path", "last", config=run_config(tiny_model_dir, tiny_data_dir))
    assert done.returncode == 0, done.stderr[-3000:]
    assert checkpoints(tmp_path, 1) == checkpoints(trained, 0)  # validations and checkpoints at 8 and 12, same losses
    reference = adapters(trained / "runs/t/version_0/checkpoints/last.ckpt")
    resumed = adapters(tmp_path / "runs/t/version_1/checkpoints/last.ckpt")
    assert resumed.keys() == reference.keys()
    for key in reference:
        assert torch.equal(resumed[key], reference[key]), key


@pytest.mark.slow
def test_kill_9_then_resume_equals_the_uninterrupted_run(trained, tiny_model_dir, tiny_data_dir, tmp_path):
    """SIGKILL during step 10; resume from last.ckpt (step 8) reproduces the run bit for bit."""
    config = run_config(tiny_model_dir, tiny_data_dir, callbacks=[signal_callback(9, "SIGKILL")])
    done = main_py(tmp_path, "fit", config=config)
    assert done.returncode == -signal.SIGKILL
    assert torch.load(tmp_path / "runs/t/version_0/checkpoints/last.ckpt", weights_only=True)["global_step"] == 8
    done = main_py(tmp_path, "fit", "--ckpt_path", "last", config=run_config(tiny_model_dir, tiny_data_dir))
    assert done.returncode == 0, done.stderr[-3000:]
    reference = adapters(trained / "runs/t/version_0/checkpoints/last.ckpt")
    resumed = adapters(tmp_path / "runs/t/version_1/checkpoints/last.ckpt")
    for key in reference:
        assert torch.equal(resumed[key], reference[key]), key
    assert checkpoints(tmp_path, 1)[1:] == [n for n in checkpoints(trained, 0) if n.startswith("step000012")]


def test_ckpt_path_last_without_a_checkpoint_refuses(tiny_model_dir, tiny_data_dir, tmp_path):
    done = main_py(tmp_path, "fit", "--ckpt_path", "last", config=run_config(tiny_model_dir, tiny_data_dir))
    assert done.returncode == 2
    assert "--ckpt_path last: there is no last checkpoint to resume from" in done.stderr
    assert "version_*" in done.stderr
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------- item 2
def test_non_finite_adapters_never_replace_the_good_checkpoint(tiny_model_dir, tiny_data_dir, tmp_path):
    """Adapters turned NaN by step 5's update: the run stops, last.ckpt keeps step 4's adapters."""
    poison = {"class_path": "tests.run_safety.faults.PoisonAdapters", "init_args": {"step": 5}}
    config = run_config(tiny_model_dir, tiny_data_dir, callbacks=[poison])
    done = main_py(tmp_path, "fit", config=config)
    assert done.returncode == 1
    assert "FloatingPointError" in done.stderr and "the adapters are already non-finite" in done.stderr
    assert "not writing an exception checkpoint" in done.stderr
    names = checkpoints(tmp_path, 0)
    assert len(names) == 2 and names[0] == "last.ckpt" and names[1].startswith("step000004-val")
    last = tmp_path / "runs/t/version_0/checkpoints/last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] == 4
    assert all(torch.isfinite(t).all() for t in ckpt["state_dict"].values())
    # The error's advice works: resume from it with a lower learning rate (and without the fault).
    done = main_py(tmp_path, "fit", "--ckpt_path", str(last), "--model.learning_rate", "1e-3",
                   config=run_config(tiny_model_dir, tiny_data_dir, max_steps=6))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "model.learning_rate changed from 0.003 (checkpoint) to 0.001" in done.stdout + done.stderr


def test_checkpoint_hook_refuses_non_finite_adapters(tiny_model_dir):
    from qblora_pl.adapters import LoRA
    from qblora_pl.checkpoints import NonFiniteAdapterError
    from qblora_pl.module import QuantizedCausalLM
    from qblora_pl.quantization import GroupwiseInt

    module = QuantizedCausalLM(str(tiny_model_dir), quantization=GroupwiseInt(bits=4, group_size=32), adapter=LoRA(r=2))
    module.configure_model()
    name, param = next((n, p) for n, p in module.named_parameters() if p.requires_grad)
    with torch.no_grad():
        param[0, 0] = math.inf
    with pytest.raises(NonFiniteAdapterError, match=rf"refusing to write a checkpoint.*{name} \(1 of"):
        module.on_save_checkpoint({"state_dict": module.state_dict()})
    with pytest.raises(NonFiniteAdapterError, match="refusing to test a model with non-finite weights"):
        module.on_test_start()


# ---------------------------------------------------------------------------------------- item 3
def test_loss_stuck_at_ln_vocab_stops_as_diverged(tiny_model_dir):
    from qblora_pl.adapters import LoRA
    from qblora_pl.checkpoints import NonFiniteAdapterError
    from qblora_pl.module import QuantizedCausalLM, TrainingDiverged
    from qblora_pl.quantization import GroupwiseInt

    module = QuantizedCausalLM(str(tiny_model_dir), quantization=GroupwiseInt(bits=4, group_size=32),
                               adapter=LoRA(r=2), divergence_patience=3)
    module.configure_model()
    uniform = math.log(module.model.config.vocab_size)
    # A randomly initialised model starts at ln(V): not a divergence.
    for _ in range(5):
        module._check_uniform_loss(torch.tensor(uniform), distributed=False)
    module._check_uniform_loss(torch.tensor(uniform * 1.4), distributed=False)  # a pretrained base's loss ...
    module._check_uniform_loss(torch.tensor(uniform), distributed=False)  # ... then collapsed
    module._check_uniform_loss(torch.tensor(uniform * (1 + 2e-5)), distributed=False)
    with pytest.raises(TrainingDiverged, match=r"ln\(vocab_size=\d+\).*3 steps in a row.*40% away from it"):
        module._check_uniform_loss(torch.tensor(uniform), distributed=False)
    with pytest.raises(NonFiniteAdapterError, match="training diverged"):  # and no checkpoint is written after
        module.on_save_checkpoint({"state_dict": module.state_dict()})


# ---------------------------------------------------------------------------------------- item 5
@pytest.mark.parametrize("content", [b"", b"PK\x03\x04truncated", os.urandom(4096), b"step: 12\nnot a checkpoint\n"],
                         ids=["empty", "truncated-zip", "random-bytes", "text"])
def test_unreadable_checkpoint_is_named(content, tmp_path):
    from qblora_pl.checkpoints import UnreadableCheckpoint, read_checkpoint

    path = tmp_path / "broken.ckpt"
    path.write_bytes(content)
    with pytest.raises(UnreadableCheckpoint, match=rf"{path}.*not a readable qblora_pl checkpoint"):
        read_checkpoint(path)


def test_truncated_checkpoint_is_named_by_fit_test_and_export(trained, tiny_model_dir, tiny_data_dir, tmp_path):
    good = (trained / "runs/t/version_0/checkpoints/last.ckpt").read_bytes()
    broken = tmp_path / "last.ckpt"
    broken.write_bytes(good[: len(good) // 2])
    config = run_config(tiny_model_dir, tiny_data_dir)
    for subcommand in ("fit", "test"):
        done = main_py(tmp_path, subcommand, "--ckpt_path", str(broken), config=config)
        assert done.returncode == 2, done.stderr[-2000:]
        assert f"--ckpt_path '{broken}'" in done.stderr and "not a readable qblora_pl checkpoint" in done.stderr
        assert "Traceback" not in done.stderr
    done = main_py(tmp_path, "export", "--ckpt_path", str(broken), "--output_dir", str(tmp_path / "exports"))
    assert done.returncode == 2 and "not a readable qblora_pl checkpoint" in done.stderr and str(broken) in done.stderr


# ---------------------------------------------------------------------------------------- item 4
def test_embedded_model_is_recorded_portably_and_resolves_after_a_move(tmp_path):
    from qblora_pl.paths import EMBEDDED_MODEL, EMBEDDED_MODEL_DIR, portable_model_reference, resolve_model_reference
    from qblora_pl.sources import ModelSource, SourceError

    assert portable_model_reference(str(EMBEDDED_MODEL_DIR)) == EMBEDDED_MODEL == "embedded:tiny-llama"
    assert resolve_model_reference(EMBEDDED_MODEL) == str(EMBEDDED_MODEL_DIR)
    # an older checkpoint's absolute path from a checkout that has since moved
    assert resolve_model_reference("/gone/checkout/qblora_pl/assets/tiny-llama") == str(EMBEDDED_MODEL_DIR)
    assert ModelSource.parse(EMBEDDED_MODEL).path == EMBEDDED_MODEL_DIR
    with pytest.raises(SourceError, match=r"model path '/gone/elsewhere/model' does not exist"):
        ModelSource.parse("/gone/elsewhere/model")


def test_checkpoint_of_a_moved_base_tests_and_exports_with_model_name_or_path(trained, tiny_model_dir, tiny_data_dir, tmp_path):
    """The base moved: --model.model_name_or_path (test) / --model_name_or_path (export) point to it."""
    import shutil

    moved = tmp_path / "moved-model"
    shutil.copytree(tiny_model_dir, moved)
    ckpt = trained / "runs/t/version_0/checkpoints/last.ckpt"
    assert torch.load(ckpt, weights_only=True)["adapter_spec"]["base"]["vocab_size"] > 0
    config = run_config(moved, tiny_data_dir)
    done = main_py(tmp_path, "test", "--ckpt_path", str(ckpt), config=config)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"base model '{moved}' instead of the recorded '{tiny_model_dir}'" in done.stdout + done.stderr
    done = main_py(tmp_path, "export", "--ckpt_path", str(ckpt), "--model_name_or_path", str(moved),
                   "--formats", "native", "--no_verify", "--output_dir", str(tmp_path / "exports"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "exports/native/qblora_config.json").is_file()
    # a checkpoint of another base (here: recorded with another vocabulary size) is refused, naming both
    other = torch.load(ckpt, weights_only=True)
    other["adapter_spec"]["base"]["vocab_size"] += 8
    torch.save(other, tmp_path / "other.ckpt")
    done = main_py(tmp_path, "export", "--ckpt_path", str(tmp_path / "other.ckpt"), "--model_name_or_path", str(moved),
                   "--formats", "native", "--no_verify", "--output_dir", str(tmp_path / "exports2"))
    assert done.returncode != 0
    assert re.search(r"vocab_size=\d+, but the model .* has vocab_size=\d+: not the same base model", done.stderr)


# ---------------------------------------------------------------------------------------- item 7
def test_accumulate_grad_batches_zero_and_oversized_batch_are_refused(tiny_model_dir, tiny_data_dir, tmp_path):
    config = run_config(tiny_model_dir, tiny_data_dir)
    done = main_py(tmp_path, "fit", "--trainer.accumulate_grad_batches", "0", config=config)
    assert done.returncode == 2 and "trainer.accumulate_grad_batches=0: it must be an integer >= 1" in done.stderr
    done = main_py(tmp_path, "fit", "--data.batch_size", "100000", config=config)
    assert done.returncode == 2  # a user error (issue #35): one message, exit 2
    assert "data.batch_size=100000 is larger than the training split (56 records)" in done.stderr
    assert not list((tmp_path / "runs").glob("t/version_*")), "a failed run left its version_N directory"


@pytest.mark.slow
def test_divergence_on_the_embedded_model_stops_the_run(tmp_path):
    """The issue's case: at learning rate 1e6 the embedded model's loss pins at ln(4096) = 8.318."""
    done = main_py(tmp_path, "fit", "--config", str(REPO / "configs/qablora.yaml"), "--model.learning_rate", "1e6",
                   "--model.warmup_steps", "0", "--model.divergence_patience", "3", "--trainer.max_steps", "8",
                   "--trainer.val_check_interval", "100", "--trainer.enable_progress_bar", "false", timeout=600)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert re.match(r"main\.py: error: training diverged: train loss 8\.317\d = ln\(vocab_size=4096\)", last), last
    assert not list(tmp_path.glob("runs/qablora/version_*/checkpoints/*.ckpt"))
    assert not (tmp_path / "exports").exists()


def test_export_names_a_hub_base_that_cannot_be_reached_offline(trained, tmp_path):
    ckpt = trained / "runs/t/version_0/checkpoints/last.ckpt"
    env_offline = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    command = [sys.executable, str(REPO / "main.py"), "export", "--ckpt_path", str(ckpt), "--model_name_or_path",
               "no-such-org/no-such-model", "--formats", "native", "--no_verify", "--output_dir", str(tmp_path / "e")]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=240,
                          env={**os.environ, **env_offline, "PYTHONPATH": str(REPO)})
    assert done.returncode == 2
    assert "hub model 'no-such-org/no-such-model'" in done.stderr and "network" in done.stderr
    done = main_py(tmp_path, "export", "--ckpt_path", str(ckpt), "--model_name_or_path", str(tmp_path / "gone"),
                   "--formats", "native", "--no_verify", "--output_dir", str(tmp_path / "e"))
    assert done.returncode == 2 and f"model path '{tmp_path / 'gone'}' does not exist" in done.stderr


# ---------------------------------------------------------------------------------------- issue 35
def test_an_unwritable_export_folder_stops_fit_before_the_model_loads(tiny_model_dir, tiny_data_dir, tmp_path):
    """A one-line user error at fit start, not a PermissionError on a hidden path after training. (Root
    writes through chmod: the folder is made unwritable by a file in its path.)"""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    export = {"class_path": "qblora_pl.callbacks.MergeExport",
              "init_args": {"output_dir": str(blocker / "exports"), "formats": ["native"], "verify": False}}
    done = main_py(tmp_path, "fit", config=run_config(tiny_model_dir, tiny_data_dir, callbacks=[export]))
    assert done.returncode == 2, done.stderr[-3000:]
    assert (f"main.py: error: MergeExport output_dir '{blocker / 'exports'}' is not writable: '{blocker}' is not a "
            "folder") in done.stderr
    assert f"Loading {tiny_model_dir}" not in done.stderr and "Traceback" not in done.stderr
    assert not list((tmp_path / "runs").glob("t/version_*")), "a run refused at its start left its version_N"
