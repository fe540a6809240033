"""The command line under hostile but realistic input: every early error reaches the user whole.

Each case runs ``python main.py ...`` on the tiny fixture model with one bad input (a data file,
a model source, a checkpoint, an option value) and asserts what a user must see: exit status 2,
one ``main.py: error:`` line that names the bad value, and no traceback - in particular not the
``AttributeError: ... '_previous_handler'`` that used to follow every error raised before the
first training step ("During handling of the above exception ...").

Marked ``adversarial`` (a subprocess per case, ~10 s each): ``.ci/run`` runs them after the unit
tests; ``python -m pytest -m adversarial`` runs them here. Add a case for every new defect found.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import TINY_RECORDS
from tests.run_safety.test_run_safety import main_py, run_config

pytestmark = pytest.mark.adversarial


def _write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def _records(n: int) -> str:
    return json.dumps(TINY_RECORDS[:n])


# Each case: (id, subcommand, how to change the config, extra command-line arguments, files to
# write first {name: bytes}, text the error line must contain).
DATA_CASES = [
    ("missing data file", {"data": {"data_path": "missing.json"}}, {}, "data_path 'missing.json' does not exist"),
    ("data file not JSON", {"data": {"data_path": "bad.json"}}, {"bad.json": "[{not json"}, "could not be parsed"),
    ("data file invalid UTF-8", {"data": {"data_path": "latin1.json"}},
     {"latin1.json": b'[{"instruction": "caf\xe9", "input": "", "output": "x"}]'}, "is not UTF-8 text"),
    ("data file of one record", {"data": {"data_path": "one.json"}}, {"one.json": _records(1)}, "is empty"),
    ("data file with an empty output", {"data": {"data_path": "empty_output.json"}},
     {"empty_output.json": json.dumps(TINY_RECORDS[:20] + [{"instruction": "Say nothing.", "input": "", "output": ""}])},
     "output"),
    ("data file of the wrong type", {"data": {"data_path": "records.csv"}}, {"records.csv": "a,b\n1,2\n"},
     "unsupported file type '.csv'"),
]
MODEL_CASES = [
    ("truncated gguf", {"model": {"model_name_or_path": "model.gguf"}}, {"model.gguf": b"GGUF\x03\x00\x00\x00trunc"},
     "model.gguf"),
    ("missing model folder", {"model": {"model_name_or_path": "./no-such-model"}}, {}, "no-such-model"),
    ("offline hub name", {"model": {"model_name_or_path": "no-such-org/no-such-model-xyz"}}, {},
     "no-such-org/no-such-model-xyz"),
    ("k_out not dividing d_out", {"model": {"adapter": {"class_path": "qblora_pl.adapters.QABLoRA",
                                                        "init_args": {"budget_rank": 4, "k_out": 5}}}}, {}, "k_out=5"),
    ("QA-BLoRA on an NF4 base", {"model": {"quantization": {"class_path": "qblora_pl.quantization.NF4"}}}, {},
     "NF4"),
]
OPTION_CASES = [
    ("bits 9", ["--model.quantization.init_args.bits", "9"], "model.quantization (GroupwiseInt): bits=9"),
    ("bits 1", ["--model.quantization.init_args.bits", "1"], "bits=1"),
    ("group_size 48", ["--model.quantization.init_args.group_size", "48"], "group_size=48"),
    ("base init awq", ["--model.quantization.init_args.init", "awq"],
     "model.quantization (GroupwiseInt): init='awq' must be one of ['rtn', 'mse', 'gptq']"),
    ("calibration_records 0", ["--model.quantization.init_args.init", "gptq",
                               "--model.quantization.init_args.calibration_records", "0"], "calibration_records=0"),
    ("group_size 0", ["--model.quantization.init_args.group_size", "0"], "group_size=0"),
    ("budget_rank 0", ["--model.adapter.init_args.budget_rank", "0"], "model.adapter (QABLoRA): QA-BLoRA budget_rank=0"),
    ("dropout 1.5", ["--model.adapter.init_args.dropout", "1.5"], "dropout=1.5 must be in [0, 1)"),
    ("alpha 0", ["--model.adapter.init_args.alpha", "0"], "alpha=0"),
    ("alpha negative", ["--model.adapter.init_args.alpha", "-16"], "alpha=-16"),
    ("learning rate 3e38", ["--model.learning_rate", "3e38"], "learning_rate=3e+38 is too large"),
    ("learning rate 0", ["--model.learning_rate", "0"], "learning_rate=0"),
    ("warmup negative", ["--model.warmup_steps", "-1"], "warmup_steps=-1"),
    ("batch size 0", ["--data.batch_size", "0"], "batch_size=0"),
    ("val_fraction 1.5", ["--data.val_fraction", "1.5"], "val_fraction=1.5"),
    ("accumulate 0", ["--trainer.accumulate_grad_batches", "0"], "trainer.accumulate_grad_batches=0"),
    ("missing checkpoint", ["--ckpt_path", "missing.ckpt"], "missing.ckpt' does not exist"),
    ("no last checkpoint", ["--ckpt_path", "last"], "no last checkpoint to resume from"),
]


def assert_one_clean_error(done, expected: str, prog: str = "main.py") -> None:
    """Exit 2, the last line ``<prog>: error: ...`` naming ``expected``, and no traceback anywhere."""
    stderr = done.stderr
    assert done.returncode == 2, f"exit {done.returncode}:\n{stderr[-3000:]}"
    assert "Traceback" not in stderr and "During handling" not in stderr, stderr[-3000:]
    assert "_previous_handler" not in stderr
    assert stderr.count(f"{prog}: error: ") == 1, stderr[-3000:]
    message = stderr[stderr.index(f"{prog}: error: "):]  # the message ends the output (it may span lines)
    assert expected in message, f"{expected!r} not in {message!r}"


def _merge(base: dict, change: dict) -> dict:
    out = dict(base)
    for key, value in change.items():
        nested = isinstance(value, dict) and isinstance(out.get(key), dict) and "class_path" not in value
        out[key] = _merge(out[key], value) if nested else value  # a class_path replaces the whole entry
    return out


@pytest.mark.parametrize("change, files, expected", [c[1:] for c in DATA_CASES + MODEL_CASES],
                         ids=[c[0] for c in DATA_CASES + MODEL_CASES])
def test_bad_input_is_one_clean_error(change, files, expected, tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name, content in files.items():
        _write(tmp_path / name, content)
    done = main_py(tmp_path, "fit", config=_merge(run_config(tiny_model_dir, tiny_data_dir), change))
    assert_one_clean_error(done, expected)
    assert not list((tmp_path / "runs").glob("*/version_*")), "a failed run left its run folder"


@pytest.mark.parametrize("args, expected", [c[1:] for c in OPTION_CASES], ids=[c[0] for c in OPTION_CASES])
def test_bad_option_value_is_one_clean_error(args, expected, tiny_model_dir, tiny_data_dir, tmp_path):
    done = main_py(tmp_path, "fit", *args, config=run_config(tiny_model_dir, tiny_data_dir))
    assert_one_clean_error(done, expected)


def test_bad_evaluation_task_option_names_where_it_sits(tiny_model_dir, tiny_data_dir, tmp_path):
    config = run_config(tiny_model_dir, tiny_data_dir)
    config["trainer"]["callbacks"].append({
        "class_path": "qblora_pl.callbacks.EvaluationSuite",
        "init_args": {"tasks": [{"class_path": "qblora_pl.evaluation.MMLU", "init_args": {"limit_per_subject": 0}}]},
    })
    done = main_py(tmp_path, "test", config=config)
    assert_one_clean_error(done, "trainer.callbacks[1].init_args.tasks[0] (MMLU): limit_per_subject=0 must be >= 1")


def test_checkpoint_of_another_base_is_one_clean_error(tiny_model_dir, tiny_data_dir, tmp_path):
    """A checkpoint trained on the 2-layer fixture, resumed on a copy of the (larger) embedded model."""
    import shutil

    from qblora_pl.paths import EMBEDDED_MODEL_DIR

    trained = main_py(tmp_path, "fit", "--trainer.max_steps", "4", config=run_config(tiny_model_dir, tiny_data_dir))
    assert trained.returncode == 0, trained.stderr[-3000:]
    ckpt = next((tmp_path / "runs" / "t" / "version_0" / "checkpoints").glob("last.ckpt"))
    larger = tmp_path / "larger-base"
    shutil.copytree(EMBEDDED_MODEL_DIR, larger)
    done = main_py(tmp_path, "fit", "--ckpt_path", str(ckpt), config=run_config(larger, tiny_data_dir, max_steps=8))
    assert_one_clean_error(done, "hidden_size")


def test_compressed_tensors_export_of_float_zero_points_is_one_clean_error(tiny_model_dir, tiny_data_dir, tmp_path):
    """A QA-BLoRA run trained without integer zero points, exported for vLLM without --round_zero_points."""
    trained = main_py(tmp_path, "fit", "--trainer.max_steps", "4", config=run_config(tiny_model_dir, tiny_data_dir))
    assert trained.returncode == 0, trained.stderr[-3000:]
    ckpt = next((tmp_path / "runs" / "t" / "version_0" / "checkpoints").glob("last.ckpt"))
    done = main_py(tmp_path, "export", "--ckpt_path", str(ckpt), "--formats", "compressed-tensors",
                   "--output_dir", str(tmp_path / "ct"))
    assert_one_clean_error(done, "not integer multiples of their scales", prog="main.py export")
    assert "--round_zero_points" in done.stderr and not (tmp_path / "ct").exists()


def test_export_errors_are_one_clean_error(tmp_path):
    done = main_py(tmp_path, "export", "--ckpt_path", "missing.ckpt")
    assert_one_clean_error(done, "missing.ckpt' does not exist", prog="main.py export")


def test_a_defect_still_shows_its_traceback(tiny_model_dir, tiny_data_dir, tmp_path):
    """Errors that are not the user's (here: a callback that raises RuntimeError) keep their traceback, exit 1."""
    config = run_config(tiny_model_dir, tiny_data_dir)
    config["trainer"]["callbacks"].append({"class_path": "tests.run_safety.faults.RaiseAtStep", "init_args": {"step": 1}})
    done = main_py(tmp_path, "fit", config=config)
    assert done.returncode == 1
    assert "Traceback" in done.stderr and "RuntimeError: injected defect at step 1" in done.stderr
    assert "_previous_handler" not in done.stderr and "During handling" not in done.stderr


@pytest.mark.skipif(os.name != "posix", reason="exit status of a POSIX process")
def test_qblora_traceback_shows_the_user_errors_traceback(tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("QBLORA_TRACEBACK", "1")
    done = main_py(tmp_path, "fit", "--data.data_path", "missing.json", config=run_config(tiny_model_dir, tiny_data_dir))
    assert done.returncode == 2
    assert "Traceback" in done.stderr and "FileNotFoundError" in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("main.py: error: data_path 'missing.json'")
