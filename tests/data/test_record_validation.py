"""Record reading and validation: exact row numbers, empty fields, drop_empty, truncation counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qblora_pl.data.datamodule import InstructionDataModule
from qblora_pl.data.records import split_indices
from qblora_pl.data.records import load_record_splits, read_json_rows, validate_records

try:  # importable both as a package module and from pytest's rootdir-less sys.path insertion
    from tests.data.tokenizer_fixture import build_tiny_tokenizer
except ImportError:  # pragma: no cover
    from tokenizer_fixture import build_tiny_tokenizer


def records(n: int) -> list[dict]:
    return [{"instruction": f"Task {i}: describe the task", "input": "", "output": f"Answer {i}."} for i in range(n)]


def write(path: Path, rows) -> Path:
    if path.suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("name", ["data.json", "data.jsonl"])
@pytest.mark.parametrize("row", [0, 7, 9])
def test_number_output_is_reported_at_its_own_row(tmp_path, name, row):
    # datasets' JSON reader inferred one column type and coerced or misplaced such rows.
    rows = records(10)
    rows[row]["output"] = 42
    path = write(tmp_path / name, rows)
    message = rf"{name}: row {row} \(0-based\): field 'output' must be a string, got int \(42\)"
    with pytest.raises(ValueError, match=message):
        InstructionDataModule(str(path)).records("train")


def test_values_are_not_coerced(tmp_path):
    rows = records(3)
    rows[1]["input"] = None  # null input reads as empty
    path = write(tmp_path / "data.jsonl", rows)
    assert validate_records(read_json_rows(path), str(path))[1] == {**rows[1], "input": ""}
    rows[2]["output"] = 3.5
    with pytest.raises(ValueError, match=r"row 2 \(0-based\): field 'output' must be a string, got float"):
        validate_records(read_json_rows(write(tmp_path / "data.jsonl", rows)), "data.jsonl")


def test_blank_jsonl_lines_are_skipped_and_parse_errors_name_the_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "output": "d"}\n')
    assert len(read_json_rows(path)) == 2
    path.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "c",\n')
    with pytest.raises(ValueError, match=r"data\.jsonl: could not be parsed as JSON Lines .*line 3 \(row 1, 0-based\)"):
        read_json_rows(path)
    (tmp_path / "obj.json").write_text('{"instruction": "a"}')
    with pytest.raises(ValueError, match=r"obj\.json: expected a JSON list of records, got a dict"):
        read_json_rows(tmp_path / "obj.json")


@pytest.mark.parametrize("field, value", [("output", ""), ("output", " \n"), ("instruction", "")])
def test_empty_field_is_an_error_naming_file_and_row(tmp_path, field, value):
    rows = records(8)
    rows[5][field] = value
    path = write(tmp_path / "data.json", rows)
    with pytest.raises(ValueError, match=rf"data\.json: row 5 \(0-based\): field '{field}' is empty.*drop_empty"):
        InstructionDataModule(str(path)).records("train")


def test_empty_input_is_fine(tmp_path):
    rows = records(3)
    rows[0]["input"] = "  "
    assert InstructionDataModule(str(write(tmp_path / "data.json", rows)), val_fraction=0, test_fraction=0).records(
        "train")[0]["input"] == "  "


def test_drop_empty_drops_after_the_split_and_counts(tmp_path):
    rows = records(40)
    empty = [3, 17, 18, 30]
    for i in empty:
        rows[i]["output"] = ""
    path = write(tmp_path / "data.jsonl", rows)
    splits = load_record_splits(path, val_fraction=0.1, test_fraction=0.2, split_seed=5, drop_empty=True)
    parts = split_indices(40, 0.1, 0.2, seed=5)
    for split, indices in parts.items():
        kept = [i for i in indices if i not in empty]
        assert [r["output"] for r in splits.records[split]] == [f"Answer {i}." for i in kept]
        assert splits.origins[split] == [(str(path), i) for i in kept]
        assert splits.dropped_empty[split] == len(indices) - len(kept)
    assert sum(splits.dropped_empty.values()) == len(empty)


def test_drop_empty_counts_show_in_split_stats(tmp_path, monkeypatch):
    rows = records(20)
    rows[0]["output"] = rows[1]["instruction"] = ""
    path = write(tmp_path / "data.json", rows)
    tokenizer_dir = str(build_tiny_tokenizer(tmp_path / "tok"))
    dm = InstructionDataModule(str(path), tokenizer_name_or_path=tokenizer_dir, drop_empty=True,
                               val_fraction=0.1, test_fraction=0.1)
    logged: list[str] = []  # Lightning's loggers may not propagate to caplog once a Trainer has run
    monkeypatch.setattr("qblora_pl.data.datamodule.rank_zero_info", logged.append)
    dm.setup("fit")
    stats = dm.split_stats()
    assert sum(s["dropped_empty"] for s in stats.values()) == 2
    assert sum(s["examples"] for s in stats.values()) == 18
    assert "dropped records with an empty field (drop_empty)" in "\n".join(logged)


def test_alpaca_truncation_is_counted_and_logged(tmp_path, monkeypatch):
    rows = records(10)
    rows[2]["instruction"] = "describe the task " * 30  # prompt cut
    rows[4]["output"] = "the response " * 30  # response cut
    rows[6]["instruction"], rows[6]["output"] = rows[2]["instruction"], rows[4]["output"]  # both
    path = write(tmp_path / "data.json", rows)
    tokenizer_dir = str(build_tiny_tokenizer(tmp_path / "tok"))
    dm = InstructionDataModule(str(path), tokenizer_name_or_path=tokenizer_dir, max_source_length=128,
                               max_target_length=24, val_fraction=0, test_fraction=0)
    logged: list[str] = []  # Lightning's loggers may not propagate to caplog once a Trainer has run
    monkeypatch.setattr("qblora_pl.data.datamodule.rank_zero_info", logged.append)
    dm.setup("fit")
    stats = dm.split_stats()["train"]
    assert (stats["truncated"], stats["source_truncated"], stats["target_truncated"]) == (3, 2, 2)
    assert ("data: train: 3 of 10 records truncated (prompt cut to max_source_length=128: 2, "
            "response cut to max_target_length=24: 2)") in "\n".join(logged)
