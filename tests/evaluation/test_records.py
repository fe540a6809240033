"""Bad evaluation input fails before any model work, naming the file and the row."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from unittest import mock

import pytest

from qblora_pl.evaluation import (
    MMLU,
    EvaluationDataError,
    GreedyExactMatch,
    InstructionPerplexity,
    ZeroShotMultipleChoice,
    resolve_tasks,
)
from qblora_pl.paths import EMBEDDED_DATA_DIR


def mmlu_record(question="Q?", choices=("w", "x", "y", "z"), answer="A", subject="words"):
    return {"question": question, "choices": list(choices), "answer": answer, "subject": subject}


def write_mmlu(directory: Path, test: list[dict], dev: list[dict]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "test.json").write_text(json.dumps(test))
    (directory / "dev.json").write_text(json.dumps(dev))
    return directory


def test_embedded_sets_load():
    assert MMLU().load_and_check() == 420
    assert ZeroShotMultipleChoice().load_and_check() == 285
    assert InstructionPerplexity().load_and_check() == 365
    assert GreedyExactMatch(limit=10).load_and_check() == 10


def test_mmlu_missing_option_names_file_and_row(tmp_path):
    test = [mmlu_record(), mmlu_record(), mmlu_record(choices=("w", "x", "y"))]
    data = write_mmlu(tmp_path / "m", test, [mmlu_record()] * 5)
    with pytest.raises(EvaluationDataError, match=r"test\.json: row 2 \(0-based\): option\(s\) D missing"):
        MMLU(data_path=str(data)).load_and_check()
    test[2] = mmlu_record(choices=("w", "", "y", "z"))
    write_mmlu(data, test, [mmlu_record()] * 5)
    with pytest.raises(EvaluationDataError, match=r"test\.json: row 2 \(0-based\): option B is missing or empty"):
        MMLU(data_path=str(data)).load_and_check()


def test_mmlu_answer_outside_options_names_file_and_row(tmp_path):
    data = write_mmlu(tmp_path / "m", [mmlu_record(), mmlu_record(answer="E")], [mmlu_record()] * 5)
    with pytest.raises(EvaluationDataError, match=r"test\.json: row 1 \(0-based\): answer 'E' is not one of the options A, B, C, D"):
        MMLU(data_path=str(data)).load_and_check()
    write_mmlu(data, [mmlu_record(answer=4)], [mmlu_record()] * 5)
    with pytest.raises(EvaluationDataError, match=r"row 0 \(0-based\): answer index 4 is outside the options"):
        MMLU(data_path=str(data)).load_and_check()


def test_mmlu_k_larger_than_dev_split(tmp_path):
    data = write_mmlu(tmp_path / "m", [mmlu_record(), mmlu_record(subject="sums")],
                      [mmlu_record()] * 5 + [mmlu_record(subject="sums")] * 2)
    with pytest.raises(EvaluationDataError, match=r"dev\.json: k_shot=5 but the 'dev' split has only 2 record\(s\) for subject 'sums'"):
        MMLU(data_path=str(data), k_shot=5).load_and_check()
    assert MMLU(data_path=str(data), k_shot=2).load_and_check() == 2


def test_mmlu_dev_row_errors_name_the_dev_file(tmp_path):
    data = write_mmlu(tmp_path / "m", [mmlu_record()], [mmlu_record()] * 3 + [mmlu_record(answer="F")])
    with pytest.raises(EvaluationDataError, match=r"dev\.json: row 3 \(0-based\): answer 'F'"):
        MMLU(data_path=str(data), k_shot=1).load_and_check()


def test_mmlu_original_csv_layout(tmp_path):
    (tmp_path / "test").mkdir()
    (tmp_path / "dev").mkdir()
    (tmp_path / "test" / "high_school_biology_test.csv").write_text('"What is a cell?",a,b,c,d,C\nQ2,a,b,c,d,A\n')
    (tmp_path / "dev" / "high_school_biology_dev.csv").write_text("D1,a,b,c,d,B\n")
    task = MMLU(data_path=str(tmp_path), k_shot=1)
    assert task.load_and_check() == 2
    assert task.records[0] == {"question": "What is a cell?", "choices": ["a", "b", "c", "d"], "label": 2,
                               "subject": "high_school_biology"}
    (tmp_path / "test" / "high_school_biology_test.csv").write_text("Q1,a,b,c,d,A\nQ2,a,b,c\n")
    with pytest.raises(EvaluationDataError, match=r"high_school_biology_test\.csv: row 1 \(0-based\): expected 6 columns"):
        MMLU(data_path=str(tmp_path), k_shot=1).load_and_check()


def test_zero_shot_bad_records(tmp_path):
    path = tmp_path / "zs.jsonl"
    good = {"query": "Question: q\nAnswer:", "choices": ["a", "bb"], "gold": 1}
    path.write_text("\n".join(json.dumps(r) for r in [good, {**good, "gold": 2}]))
    with pytest.raises(EvaluationDataError, match=r"zs\.jsonl: row 1 \(0-based\): gold answer 2 is outside the 2 options"):
        ZeroShotMultipleChoice(data_path=str(path)).load_and_check()
    path.write_text("\n".join(json.dumps(r) for r in [good, good, {**good, "choices": ["a", None, "c"]}]))
    with pytest.raises(EvaluationDataError, match=r"zs\.jsonl: row 2 \(0-based\): option 1 \(B\) is missing or empty"):
        ZeroShotMultipleChoice(data_path=str(path)).load_and_check()
    path.write_text(json.dumps({**good, "gold": "C"}))
    with pytest.raises(EvaluationDataError, match=r"row 0 \(0-based\): gold answer 2 is outside"):
        ZeroShotMultipleChoice(data_path=str(path)).load_and_check()


def test_record_formats_follow_lm_eval_prompts(tmp_path):
    arc = tmp_path / "arc.json"
    arc.write_text(json.dumps([{"question": "Sky?", "choices": {"text": ["blue", "red"], "label": ["A", "B"]}, "answerKey": "A"}]))
    task = ZeroShotMultipleChoice(data_path=str(arc), record_format="arc")
    task.load_and_check()
    assert task.records == [{"query": "Question: Sky?\nAnswer:", "choices": ["blue", "red"], "gold": 0}]
    boolq = tmp_path / "boolq.json"
    boolq.write_text(json.dumps([{"passage": "P.", "question": "is it", "answer": True}]))
    task = ZeroShotMultipleChoice(data_path=str(boolq), record_format="boolq")
    task.load_and_check()
    assert task.records == [{"query": "P.\nQuestion: is it?\nAnswer:", "choices": ["no", "yes"], "gold": 1}]
    hs = tmp_path / "hs.json"
    hs.write_text(json.dumps([{"activity_label": "Cooking", "ctx_a": "A man", "ctx_b": "cuts [title] it",
                               "endings": ["a", "b", "c", "d"], "label": "3"}]))
    task = ZeroShotMultipleChoice(data_path=str(hs), record_format="hellaswag")
    task.load_and_check()
    assert task.records[0]["query"] == "Cooking: A man Cuts. it" and task.records[0]["gold"] == 3


def test_instruction_record_missing_output(tmp_path):
    path = tmp_path / "test.json"
    path.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c", "input": "d"}]))
    with pytest.raises(EvaluationDataError, match=r"test\.json: row 1 \(0-based\): required field 'output' is missing"):
        GreedyExactMatch(data_path=str(tmp_path)).load_and_check()


def test_unknown_task_name_and_duplicates():
    with pytest.raises(ValueError, match=r"unknown evaluation task name 'mmlux' \(tasks\[1\]\); known names: exact_match, instruction_ppl, mmlu, zero_shot"):
        resolve_tasks(["mmlu", "mmlux"])
    with pytest.raises(ValueError, match=r"repeated: \['mmlu'\]"):
        resolve_tasks(["mmlu", MMLU(k_shot=0)])
    assert [t.name for t in resolve_tasks(["mmlu", MMLU(k_shot=0, name="mmlu_0shot")])] == ["mmlu", "mmlu_0shot"]


def test_unknown_task_class_path_is_rejected_by_the_cli(tmp_path, monkeypatch, capsys):
    from qblora_pl.cli import QBLoRACLI
    from qblora_pl.data.datamodule import InstructionDataModule
    from qblora_pl.module import QuantizedCausalLM

    monkeypatch.chdir(tmp_path)
    config = tmp_path / "eval.yaml"
    config.write_text("trainer:\n  callbacks:\n    - class_path: qblora_pl.callbacks.EvaluationSuite\n      init_args:\n"
                      "        tasks:\n          - class_path: qblora_pl.evaluation.NoSuchTask\n")
    with mock.patch.object(sys, "argv", ["main.py"]), pytest.raises(SystemExit):
        QBLoRACLI(QuantizedCausalLM, InstructionDataModule, run=False, args=["--config", str(config)])
    assert "qblora_pl.evaluation.NoSuchTask" in capsys.readouterr().err


def test_embedded_zero_shot_set_is_reproducible(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
    import build_zero_shot_dataset

    build_zero_shot_dataset.main(["--seed", "0", "--out", str(tmp_path / "test.json")])
    assert (tmp_path / "test.json").read_text() == (EMBEDDED_DATA_DIR / "zero_shot" / "test.json").read_text()
