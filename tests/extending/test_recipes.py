"""docs/extending.md's recipes, run through ``main.py`` as a user would (tests/extending/recipes.py).

One fit trains the user's own adapter method (named by ``class_path``) and exports to the user's own
format (named by import path in ``MergeExport(formats)``); ``main.py test`` then scores the user's own
evaluation task, and ``main.py export --ckpt_path`` rebuilds the method from the checkpoint.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.extending.recipes import RSLoRA, TorchStateDictFormat
from tests.run_safety.test_run_safety import main_py, run_config

FORMAT_PATH = "tests.extending.recipes.TorchStateDictFormat"


def _config(model_dir, data_dir, **extra):
    export = {"class_path": "qblora_pl.callbacks.MergeExport",
              "init_args": {"formats": ["native", FORMAT_PATH],
                            "format_options": {"torch-state-dict": {"dtype": "float32"}}}}
    config = run_config(model_dir, data_dir, max_steps=4, callbacks=[export], **extra)
    config["model"]["adapter"] = {"class_path": "tests.extending.recipes.RSLoRA", "init_args": {"r": 4, "alpha": 8}}
    return config


@pytest.fixture(scope="module")
def fitted(tiny_model_dir, tiny_data_dir, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("recipes")
    done = main_py(cwd, "fit", config=_config(tiny_model_dir, tiny_data_dir))
    assert done.returncode == 0, done.stderr[-3000:]
    return cwd, cwd / "runs/t/version_0"


def test_the_adapter_method_trains_with_its_own_scaling(fitted):
    _, run = fitted
    checkpoint = torch.load(run / "checkpoints/last.ckpt", weights_only=True)
    assert checkpoint["adapter_spec"]["strategy"] == "tests.extending.recipes.RSLoRA"
    assert checkpoint["global_step"] == 4
    from qblora_pl.adapters.lora import LoRAAdapter

    adapter = RSLoRA(r=4, alpha=8).build_adapter("layer", None, 64, 64)
    assert isinstance(adapter, LoRAAdapter) and adapter.scaling == pytest.approx(8 / math.sqrt(4))  # LoRA: 8 / 4


def test_the_export_format_is_written_and_verified(fitted):
    _, run = fitted
    report = json.loads((run / "exports/export_report.json").read_text())
    ours = report["formats"][TorchStateDictFormat.name]
    assert (run / "exports/torch/model.pt").is_file() and ours["dtype"] == "torch.float32"
    assert ours["verification"]["max_abs_logit_diff"] < 1e-4 and ours["verification"]["argmax_agreement"] == 1.0


def test_the_evaluation_task_scores_in_main_py_test(fitted, tiny_model_dir, tiny_data_dir):
    cwd, run = fitted
    records = cwd / "keywords.json"
    records.write_text(json.dumps([{"prompt": f"The word is {w}. Repeat it:", "keyword": w, "distractor": d}
                                   for w, d in [("cat", "sleep"), ("mat", "French"), ("text", "diet")]]))
    config = _config(tiny_model_dir, tiny_data_dir)
    config["trainer"]["callbacks"] = [{"class_path": "qblora_pl.callbacks.EvaluationSuite", "init_args": {
        "tasks": [{"class_path": "tests.extending.recipes.KeywordRecall", "init_args": {"data_path": str(records)}}],
        "progress_bar": False}}]
    done = main_py(cwd, "test", "--ckpt_path", str(run / "checkpoints/last.ckpt"), config=config)
    assert done.returncode == 0, done.stderr[-3000:]
    (report_path,) = (cwd / "runs/t").glob("version_*/evaluation.json")
    task = json.loads(report_path.read_text())["tasks"]["keyword_recall"]
    assert task["examples"] == 3 and set(task["metrics"]) >= {"acc", "margin"}
    assert task["config"]["class"] == "tests.extending.recipes.KeywordRecall"


def test_a_bad_record_of_the_task_is_named_before_the_model_loads(fitted, tiny_model_dir, tiny_data_dir):
    cwd, run = fitted
    records = cwd / "bad_keywords.json"
    records.write_text(json.dumps([{"prompt": "p", "keyword": "k", "distractor": "d"}, {"prompt": "p", "keyword": 3}]))
    config = _config(tiny_model_dir, tiny_data_dir)
    config["trainer"]["callbacks"] = [{"class_path": "qblora_pl.callbacks.EvaluationSuite", "init_args": {
        "tasks": [{"class_path": "tests.extending.recipes.KeywordRecall", "init_args": {"data_path": str(records)}}]}}]
    done = main_py(cwd, "test", "--ckpt_path", str(run / "checkpoints/last.ckpt"), config=config)
    assert done.returncode == 2 and "bad_keywords.json row 1: field 'keyword' must be a string" in done.stderr, \
        done.stderr[-3000:]


def test_main_py_export_rebuilds_the_method_and_writes_the_format(fitted):
    cwd, run = fitted
    done = main_py(cwd, "export", "--ckpt_path", str(run / "checkpoints/last.ckpt"), "--formats", "native", FORMAT_PATH,
                   "--output_dir", str(cwd / "from_checkpoint"))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((cwd / "from_checkpoint/export_report.json").read_text())
    assert report["method"]["adapter"]["class"] == "RSLoRA"
    assert report["formats"]["torch-state-dict"]["verification"]["max_abs_logit_diff"] < 1e-4
