"""Zero-shot multiple choice by per-choice log-likelihood: :class:`ZeroShotMultipleChoice`.

lm-evaluation-harness's ``multiple_choice`` output type: the log-likelihood of ``" " + choice``
after the query, ``acc`` = argmax of the sums and ``acc_norm`` = argmax of the sums divided by
each choice's length in characters. The record formats (HellaSwag, PIQA, ARC and BoolQ, with the
harness's prompts) are in :mod:`qblora_pl.evaluation.record_parsers`.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Literal

import torch
from torchmetrics import MeanMetric

from qblora_pl.evaluation.base import EvaluationDataError, EvaluationTask, outcomes, read_records
from qblora_pl.evaluation.record_parsers import RECORD_FORMATS, _RowError, check_choice_record, detect_record_format
from qblora_pl.evaluation.scoring import LanguageModelScorer
from qblora_pl.paths import EMBEDDED_DATA_DIR
from qblora_pl.sources import load_hub_dataset, looks_like_local_path



class ZeroShotMultipleChoice(EvaluationTask):
    """Zero-shot multiple choice by per-choice log-likelihood; reports ``acc`` and ``acc_norm``.

    ``acc_norm`` divides each choice's log-likelihood by its length in characters before the
    argmax (lm-evaluation-harness's convention). A ``task`` field in the records adds
    ``acc/<task>`` and ``acc_norm/<task>``.

    Args:
        data_path: a local ``.json``/``.jsonl``/``.csv`` file or a hub dataset name
            (``hellaswag``, ``allenai/ai2_arc``, ``ybisk/piqa``, ``google/boolq``). Default: the
            embedded ARC-style set built from the instruction test split.
        record_format: how a row maps to query / choices / gold: ``generic`` (``query``,
            ``choices``, ``gold`` index or letter), ``hellaswag``, ``piqa``, ``arc`` (the official
            AI2 JSONL layout or the hub's flattened one), ``boolq``; ``auto`` (default) picks one
            from the first row's keys.
        hf_name: hub configuration (``ARC-Easy``).
        hf_split: hub split (``validation``).
        target_delimiter: text between the query and each choice (lm-eval's default ``" "``).
        limit: evaluate only the first ``N`` records in file order (every record is still
            validated) - the same questions as lm-evaluation-harness's ``--limit N``.
    """

    default_name = "zero_shot"

    def __init__(self, data_path: str = str(EMBEDDED_DATA_DIR / "zero_shot" / "test.json"),
                 record_format: Literal["auto", "generic", "hellaswag", "piqa", "arc", "boolq"] = "auto",
                 hf_name: str | None = None, hf_split: str = "validation", target_delimiter: str = " ",
                 name: str | None = None, limit: int | None = None) -> None:
        super().__init__(name, limit)
        if record_format != "auto" and record_format not in RECORD_FORMATS:
            raise ValueError(f"record_format={record_format!r} is not one of {['auto', *sorted(RECORD_FORMATS)]}")
        self.data_path = data_path
        self.record_format = record_format
        self.hf_name = hf_name
        self.hf_split = hf_split
        self.target_delimiter = target_delimiter
        self.records: list[dict[str, Any]] = []
        self.detected_format: str | None = None

    def _load(self) -> None:
        if looks_like_local_path(self.data_path):
            rows = read_records(self.data_path)
            source = str(Path(self.data_path).expanduser())
        else:
            rows = load_hub_dataset(self.data_path, self.hf_name, self.hf_split, error=EvaluationDataError)
            source = f"hub dataset {self.data_path!r} (config={self.hf_name!r}, split={self.hf_split!r})"
        if not rows:
            raise EvaluationDataError(f"{source}: no records")
        fmt = self.record_format
        if fmt == "auto":
            fmt = detect_record_format(rows[0], f"{source}: row 0 (0-based)")
        self.detected_format = fmt
        convert = RECORD_FORMATS[fmt]
        records = []
        for i, row in enumerate(rows):
            where = f"{source}: row {i} (0-based)"
            try:
                fields = convert(row)
            except _RowError as err:
                raise EvaluationDataError(f"{where}: {err}") from None
            record = check_choice_record(*fields, where)
            task = row.get("task")
            if isinstance(task, str) and task:
                record["task"] = task
            records.append(record)
        if not records:
            raise EvaluationDataError(f"{source}: no records")
        self.records = self._limited(records)

    def num_examples(self) -> int:
        return len(self.records)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "data_path": self.data_path, "record_format": self.record_format,
                "detected_format": self.detected_format,
                "hf_name": self.hf_name, "hf_split": self.hf_split, "target_delimiter": self.target_delimiter}

    def requests(self, scorer: LanguageModelScorer) -> list[tuple[list[int], list[int]]]:
        return [scorer.encode_pair(r["query"], self.target_delimiter + c) for r in self.records for c in r["choices"]]

    def choice_loglikelihoods(self, scorer: LanguageModelScorer) -> list[list[float]]:
        """Per record, the log-likelihood of each choice (the numbers both accuracies are taken from)."""
        flat = scorer.loglikelihoods(self.requests(scorer), desc=f"{self.name} (choices)")
        out, start = [], 0
        for record in self.records:
            n = len(record["choices"])
            out.append([ll for ll, _ in flat[start: start + n]])
            start += n
        return out

    def _evaluate(self, scorer: LanguageModelScorer) -> dict[str, float]:
        metrics: dict[str, MeanMetric] = defaultdict(lambda: MeanMetric(sync_on_compute=False))
        hits: dict[str, list[float]] = {"acc": [], "acc_norm": []}
        for record, lls in zip(self.records, self.choice_loglikelihoods(scorer)):
            lls_t = torch.tensor(lls, dtype=torch.float64)
            lengths = torch.tensor([float(len(c)) for c in record["choices"]], dtype=torch.float64)
            hit = float(int(lls_t.argmax()) == record["gold"])
            hit_norm = float(int((lls_t / lengths).argmax()) == record["gold"])
            hits["acc"].append(hit)
            hits["acc_norm"].append(hit_norm)
            for suffix in ("", f"/{record['task']}") if "task" in record else ("",):
                metrics["acc" + suffix].update(hit)
                metrics["acc_norm" + suffix].update(hit_norm)
        self.per_example = {metric: outcomes(values) for metric, values in hits.items()}
        order = sorted(metrics, key=lambda k: (k.count("/"), k))
        return {k: float(metrics[k].compute()) for k in order}
