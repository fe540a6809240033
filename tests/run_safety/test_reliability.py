"""Silent-wrong cases of the 140-case adversarial re-test (issue #35), each now right or refused.

Every test here failed on the code before the fix: two fits in one folder shared ``version_0``;
``last.ckpt`` lagged the run; a NaN validation became ``last.ckpt`` and the error recommended it;
a collapsed (uniform-prediction) model passed ``fit``; a resume onto other data skipped most of
it; ``--seed_everything`` on resume was printed but ignored; ``--trainer.default_root_dir`` was
ignored; an export after the checkout moved lost its tokenizer. Real ``main.py`` runs on the
tiny fixture model (seconds each).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from tests.run_safety.test_run_safety import REPO, adapters, main_py, run_config


def _ckpt_steps(directory) -> dict[str, int]:
    return {p.name: torch.load(p, weights_only=True)["global_step"] for p in sorted(directory.glob("*.ckpt"))}


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tiny_data_dir, tmp_path_factory):
    """An 8-step run, checkpoints every 4 steps."""
    cwd = tmp_path_factory.mktemp("trained")
    done = main_py(cwd, "fit", config=run_config(tiny_model_dir, tiny_data_dir, max_steps=8))
    assert done.returncode == 0, done.stderr[-3000:]
    return cwd / "runs/t/version_0/checkpoints/last.ckpt"


def test_two_fits_started_together_get_their_own_run_folders(tiny_model_dir, tiny_data_dir, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(run_config(tiny_model_dir, tiny_data_dir, max_steps=4)))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    runs = [subprocess.Popen([sys.executable, str(REPO / "main.py"), "fit", "--config", str(config),
                              "--seed_everything", str(seed)], cwd=tmp_path, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for seed in (1, 2)]
    for run in runs:
        _, stderr = run.communicate(timeout=240)
        assert run.returncode == 0, stderr[-3000:]
    folders = sorted(p.name for p in (tmp_path / "runs/t").iterdir())
    assert folders == ["version_0", "version_1"]
    seeds = set()
    for folder in folders:
        names = sorted(p.name for p in (tmp_path / "runs/t" / folder / "checkpoints").glob("*.ckpt"))
        assert names == ["last.ckpt", "step000004-val" + names[1].split("-val")[1]], names  # no last-v1.ckpt
        seeds.add(yaml.safe_load((tmp_path / "runs/t" / folder / "config.yaml").read_text())["seed_everything"])
    assert seeds == {1, 2}


def test_last_checkpoint_is_the_newest_good_state_and_the_final_one(tiny_model_dir, tiny_data_dir, tmp_path):
    """save_top_k=1 on ``step`` (mode min) keeps step 2 as the only top-k file: last.ckpt must still move on."""
    config = run_config(tiny_model_dir, tiny_data_dir, max_steps=7)
    config["trainer"]["val_check_interval"] = 2
    config["trainer"]["callbacks"][0]["init_args"].update(monitor="step", mode="min", save_top_k=1,
                                                          filename="step{step:06d}")
    done = main_py(tmp_path, "fit", config=config)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = _ckpt_steps(tmp_path / "runs/t/version_0/checkpoints")
    assert steps == {"last.ckpt": 7, "step000002.ckpt": 2}  # 7: the state the fit ended with (and exported)


def test_nan_validation_writes_no_checkpoint_and_the_advice_names_a_good_one(tiny_model_dir, tiny_data_dir, tmp_path):
    """Finite but huge adapters after step 6 (val loss NaN at step 6): no step-6 file, last.ckpt stays at 4."""
    blow_up = {"class_path": "tests.run_safety.faults.ScaleAdapters", "init_args": {"step": 6, "factor": 1e30}}
    config = run_config(tiny_model_dir, tiny_data_dir, callbacks=[blow_up], max_steps=10)
    config["trainer"]["val_check_interval"] = 2
    done = main_py(tmp_path, "fit", config=config)
    assert done.returncode == 1, done.stderr[-3000:]
    directory = tmp_path / "runs/t/version_0/checkpoints"
    steps = _ckpt_steps(directory)
    assert steps["last.ckpt"] == 4 and max(steps.values()) == 4 and not any("nan" in name for name in steps), steps
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith("main.py: error: training loss is nan")
    assert f"--ckpt_path {os.path.join('runs', 't', 'version_0', 'checkpoints', 'last.ckpt')}" in error
    assert "val/loss = nan (the state is not good)" in done.stderr


def test_a_collapsed_model_fails_fit_instead_of_ranking_best(tiny_model_dir, tiny_data_dir, tmp_path):
    collapse = {"class_path": "tests.run_safety.faults.CollapseToUniform", "init_args": {"step": 3}}
    config = run_config(tiny_model_dir, tiny_data_dir, callbacks=[collapse], max_steps=8)
    config["trainer"]["val_check_interval"] = 2
    done = main_py(tmp_path, "fit", config=config)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "predicts the uniform distribution at the validation of step 4" in done.stderr.strip().splitlines()[-1]
    assert _ckpt_steps(tmp_path / "runs/t/version_0/checkpoints") == {"last.ckpt": 2, "step000002-val" + next(
        p.name.split("-val")[1] for p in (tmp_path / "runs/t/version_0/checkpoints").glob("step*")): 2}


def test_testing_a_collapsed_model_reports_it_instead_of_a_perplexity(trained, tiny_model_dir, tiny_data_dir, tmp_path):
    collapse = {"class_path": "tests.run_safety.faults.CollapseToUniform", "init_args": {"step": -1}}
    config = run_config(tiny_model_dir, tiny_data_dir, callbacks=[collapse])
    done = main_py(tmp_path, "test", "--ckpt_path", str(trained), config=config)
    assert done.returncode == 1, done.stderr[-3000:]
    error = done.stderr[done.stderr.index("main.py: error: "):]
    assert "the model predicts the uniform distribution at the test" in error and "test an earlier checkpoint" in error
    healthy = main_py(tmp_path, "test", "--ckpt_path", str(trained), config=run_config(tiny_model_dir, tiny_data_dir))
    assert healthy.returncode == 0, healthy.stderr[-3000:]


def test_predicts_uniform_only_when_every_scored_position_is_flat():
    from qblora_pl.module import _predicts_uniform

    labels = torch.tensor([[-100, -100, 5, 6]])
    flat = torch.zeros(1, 4, 10)
    assert _predicts_uniform(flat, labels)
    peaked = flat.clone()
    peaked[0, 2, 3] = 1.0  # position 2 predicts token 3 (scored: label at 3)
    assert not _predicts_uniform(peaked, labels)
    unscored = flat.clone()
    unscored[0, 0, 3] = 1.0  # position 0 is not scored
    assert _predicts_uniform(unscored, labels)


def test_resume_onto_other_data_is_refused_and_a_moved_copy_resumes(trained, tiny_model_dir, tiny_data_dir, tmp_path):
    other = tmp_path / "other-data"
    other.mkdir()
    for split in ("train", "val", "test"):
        records = json.loads((tiny_data_dir / f"{split}.json").read_text())
        (other / f"{split}.json").write_text(json.dumps(records[: len(records) // 2] if split == "train" else records))
    done = main_py(tmp_path, "fit", "--ckpt_path", str(trained),
                   config=run_config(tiny_model_dir, other, max_steps=10))
    assert done.returncode == 2, done.stderr[-3000:]
    error = done.stderr.strip().splitlines()[-1]
    assert "the checkpoint was trained on other data" in error and "28 different ones" in error
    assert str(other) in error and str(tiny_data_dir) in error
    moved = tmp_path / "moved-data"
    shutil.copytree(tiny_data_dir, moved)
    done = main_py(tmp_path, "fit", "--ckpt_path", str(trained), config=run_config(tiny_model_dir, moved, max_steps=10))
    assert done.returncode == 0, done.stderr[-3000:]


def test_seed_everything_on_resume_applies_from_the_resume_point(trained, tiny_model_dir, tiny_data_dir, tmp_path):
    results = {}
    for seed in (42, 123):
        cwd = tmp_path / str(seed)
        cwd.mkdir()
        done = main_py(cwd, "fit", "--ckpt_path", str(trained), "--seed_everything", str(seed),
                       config=run_config(tiny_model_dir, tiny_data_dir, max_steps=10))
        assert done.returncode == 0, done.stderr[-3000:]
        results[seed] = (done.stdout + done.stderr, adapters(cwd / "runs/t/version_0/checkpoints/last.ckpt"))
        assert yaml.safe_load((cwd / "runs/t/version_0/config.yaml").read_text())["seed_everything"] == seed
    assert "Resume: seed_everything" not in results[42][0]
    assert "Resume: seed_everything=123 replaces the checkpoint's 42" in results[123][0]
    assert any(not torch.equal(results[42][1][k], results[123][1][k]) for k in results[42][1])  # dropout differs


def test_default_root_dir_moves_the_configs_logger(tiny_model_dir, tiny_data_dir, tmp_path):
    done = main_py(tmp_path, "fit", "--trainer.default_root_dir", "elsewhere",
                   config=run_config(tiny_model_dir, tiny_data_dir, max_steps=4))
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "elsewhere/runs/t/version_0/checkpoints/last.ckpt").is_file()
    assert not (tmp_path / "runs").exists()


def test_export_after_the_model_and_data_moved_verifies_on_held_out_records(trained, tiny_model_dir, tiny_data_dir,
                                                                           tmp_path):
    """The checkpoint recorded absolute model / tokenizer / data paths; all three moved."""
    model, data = tmp_path / "model-moved", tmp_path / "data-moved"
    shutil.copytree(tiny_model_dir, model)
    shutil.copytree(tiny_data_dir, data)
    ckpt = torch.load(trained, weights_only=True)
    gone = str(tmp_path / "gone")
    ckpt["hyper_parameters"]["model_name_or_path"] = gone + "/model"
    ckpt["datamodule_hyper_parameters"].update(tokenizer_name_or_path=gone + "/model", data_path=gone + "/data")
    torch.save(ckpt, tmp_path / "moved.ckpt")
    done = main_py(tmp_path, "export", "--ckpt_path", str(tmp_path / "moved.ckpt"), "--model_name_or_path", str(model),
                   "--data_path", str(data), "--formats", "native", "--output_dir", str(tmp_path / "exports"))
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout + done.stderr
    assert "could not be read" not in out and f"validation split of {data}" in out


def test_a_byte_order_mark_is_not_an_error(tmp_path):
    from qblora_pl.data.records import read_json_rows

    rows = [{"instruction": "Say hi.", "input": "", "output": "hi"}]
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(rows).encode())
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps(rows[0]).encode() + b"\n")
    assert read_json_rows(tmp_path / "bom.json") == rows
    assert read_json_rows(tmp_path / "bom.jsonl") == rows


@pytest.mark.parametrize("method, args", [
    ("LoRA", {"r": 8, "alpha": 0}), ("QALoRA", {"r": 8, "alpha": 0.0}), ("QBLoRA", {"r": 8, "alpha": -1}),
    ("QABLoRA", {"budget_rank": 8, "alpha": float("nan")}), ("QABLoRA", {"budget_rank": -2}),
    ("QALoRA", {"pool_window": 0}),
])
def test_zero_or_negative_scaling_and_sizes_are_refused_by_name(method, args):
    import qblora_pl.adapters as adapters_package
    from qblora_pl.adapters.base import AdapterConfigError

    bad = next(k for k, v in args.items() if k != "r" and k != "budget_rank" or v <= 0)
    with pytest.raises(AdapterConfigError, match=rf"{bad}=({args[bad]}|nan) must be positive"):
        getattr(adapters_package, method)(**args)
