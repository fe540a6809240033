"""The evaluation-task interface and the record readers the tasks share.

A task has two phases, kept apart on purpose:

1. :meth:`EvaluationTask.load_and_check` reads and validates *every* record (and, for k-shot
   tasks, the dev split) with no model and no tokenizer. The ``EvaluationSuite`` callback calls
   it for all tasks in ``setup``, before Lightning builds the model, so a bad row in the last
   file of the last task fails in seconds, naming the file and the row.
2. :meth:`EvaluationTask.evaluate` scores the model through a
   :class:`~qblora_pl.evaluation.scoring.LanguageModelScorer` and returns flat
   ``{metric: value}`` floats (accumulated in torchmetrics metrics).
"""

from __future__ import annotations

import csv
import json
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qblora_pl.evaluation.scoring import LanguageModelScorer

RECORD_SUFFIXES = (".json", ".jsonl", ".csv")


def outcomes(hits) -> str:
    """Per-example 0/1 outcomes (bools, 0/1 floats or a bool tensor) as a compact ``"0110..."``."""
    return "".join("1" if bool(h) else "0" for h in hits)


class EvaluationDataError(ValueError):
    """An evaluation record (or the task's configuration of its data) is unusable.

    The message names the source (file or hub dataset) and the 0-based row.
    """


class EvaluationTask(ABC):
    """One evaluation: validated records in, ``{metric: float}`` out.

    Args:
        name: the task's name in logs (``test/<name>/<metric>``), tables and JSON. Names must be
            unique within a suite.
        limit: evaluate only the first ``limit`` records (quick runs); ``None`` for all.
    """

    default_name: str = "task"

    def __init__(self, name: str | None = None, limit: int | None = None) -> None:
        if limit is not None and limit < 1:
            raise ValueError(f"limit={limit} must be >= 1 (or None for all records)")
        self.name = name or self.default_name
        if not self.name or "/" in self.name:
            raise ValueError(f"task name {self.name!r} must be non-empty and contain no '/'")
        self.limit = limit
        self._loaded = False
        #: each example's outcome in the last :meth:`evaluate`, per metric that is a mean of
        #: 0/1 outcomes: ``{"acc": "0110..."}`` in record order (``None`` for tasks that keep
        #: none). Two models scored on the same records compare per example (a paired test),
        #: which separates far smaller differences than two accuracies' own sampling errors.
        self.per_example: dict[str, str] | None = None

    def load_and_check(self) -> int:
        """Read and validate all records (once; later calls are free); return how many will be evaluated."""
        if not self._loaded:
            self._load()
            self._loaded = True
        return self.num_examples()

    @abstractmethod
    def _load(self) -> None:
        """Read and validate the records; raise :class:`EvaluationDataError` naming file and row."""

    @abstractmethod
    def num_examples(self) -> int:
        """How many examples :meth:`evaluate` scores (after ``limit``)."""

    @abstractmethod
    def _evaluate(self, scorer: LanguageModelScorer) -> dict[str, float]:
        """Score the loaded records; return flat metric values."""

    def evaluate(self, scorer: LanguageModelScorer) -> dict[str, float]:
        """Validate (if not done yet) then score; returns ``{metric: value}``."""
        self.load_and_check()
        return self._evaluate(scorer)

    def config(self) -> dict[str, Any]:
        """The task's settings, for the JSON report."""
        return {"class": f"{type(self).__module__}.{type(self).__qualname__}", "name": self.name, "limit": self.limit}

    def _limited(self, records: list) -> list:
        return records if self.limit is None else records[: self.limit]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


# --------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------


def read_records(path: str | Path, csv_fieldnames: list[str] | None = None) -> list[dict[str, Any]]:
    """Read a ``.json`` list of objects, a ``.jsonl`` file (one object a line) or a ``.csv`` file.

    A CSV file is read with its header row, unless ``csv_fieldnames`` is given (for headerless
    files such as the original MMLU CSVs). CSV goes through the :mod:`csv` module on a file opened
    with ``newline=''``, so a quoted field keeps its embedded newlines (``\\n``, ``\\r\\n``) and
    characters that :meth:`str.splitlines` would split on (``\\x85``, ``\\u2028``) stay text; JSONL
    lines end at ``\\n`` only, for the same reason. Files are UTF-8 (a leading byte-order mark is
    dropped). Raises :class:`EvaluationDataError` naming the file (and the line or row) when it
    cannot be read or a row is not an object.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise EvaluationDataError(f"{path}: no such file (cwd is {Path.cwd()})")
    if path.suffix not in RECORD_SUFFIXES:
        raise EvaluationDataError(f"{path}: unsupported file type {path.suffix!r}; expected .json, .jsonl or .csv")
    try:
        if path.suffix == ".csv":
            return _read_csv(path, csv_fieldnames)
        if path.suffix == ".jsonl":
            rows = _read_jsonl(path)
        else:
            text = path.read_text(encoding="utf-8-sig")
            try:
                rows = json.loads(text) if text.strip() else []
            except json.JSONDecodeError as err:
                raise EvaluationDataError(f"{path}: not valid JSON: {err}") from err
            if not isinstance(rows, list):
                raise EvaluationDataError(f"{path}: expected a JSON list of records, got a {type(rows).__name__}")
    except UnicodeDecodeError as err:
        raise EvaluationDataError(f"{path}: not UTF-8 text: {err}") from err
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise EvaluationDataError(f"{path}: row {i} (0-based) is a {type(row).__name__}, expected a JSON object")
    return [dict(row) for row in rows]


def _read_csv(path: Path, fieldnames: list[str] | None) -> list[dict[str, Any]]:
    rows = []
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle, fieldnames=fieldnames)
        i = -1
        try:
            for i, row in enumerate(reader):
                if None in row or any(v is None for v in row.values()):
                    names = list(fieldnames or reader.fieldnames or [])
                    got = sum(v is not None for k, v in row.items() if k is not None) + len(row.get(None) or [])
                    raise EvaluationDataError(
                        f"{path}: row {i} (0-based): expected {len(names)} columns ({', '.join(names)}), got {got} "
                        f"(the row ends on line {reader.line_num})")
                rows.append(dict(row))
        except csv.Error as err:
            raise EvaluationDataError(f"{path}: row {i + 1} (0-based; line {reader.line_num}): not valid CSV: {err}") from err
    return rows


def _read_jsonl(path: Path) -> list[Any]:
    rows = []
    with path.open(encoding="utf-8-sig", newline="") as handle:
        # Split at "\n" only: JSON strings may hold raw \x85 / \u2028, which str.splitlines splits at.
        for line_no, line in enumerate(handle.read().split("\n")):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise EvaluationDataError(f"{path}: line {line_no + 1} is not valid JSON: {err}") from err
    return rows


def require_text(record: Mapping[str, Any], field: str, where: str, allow_empty: bool = False) -> str:
    """``record[field]`` as a string; :class:`EvaluationDataError` naming ``where`` if absent or not text."""
    value = record.get(field)
    if value is None:
        raise EvaluationDataError(f"{where}: required field {field!r} is missing or null")
    if not isinstance(value, str):
        raise EvaluationDataError(f"{where}: field {field!r} must be a string, got {type(value).__name__} ({value!r:.60})")
    if not allow_empty and not value.strip():
        raise EvaluationDataError(f"{where}: field {field!r} is empty")
    return value
