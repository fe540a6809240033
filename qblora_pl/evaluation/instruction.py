"""Instruction-set tasks: perplexity / response loss, and greedy generation scored by exact match.

Both read Alpaca-style records (``instruction``, optional ``input``, ``output``; an optional
``task`` field gives per-task breakdowns) and build prompts exactly as training does
(:func:`qblora_pl.data.tokenization.tokenize_records`: BOS, the prompt template, the response,
EOS), so the numbers are comparable with the training run's ``val/loss``.
"""

from __future__ import annotations

import re
import string
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torchmetrics import MeanMetric
from torchmetrics.text import Perplexity

from qblora_pl.data.tokenization import IGNORE_INDEX, InstructionCollator, tokenize_records
from qblora_pl.data.prompts import get_template
from qblora_pl.evaluation.base import EvaluationDataError, EvaluationTask, read_records, require_text
from qblora_pl.evaluation.scoring import LanguageModelScorer
from qblora_pl.paths import EMBEDDED_DATA_DIR
from qblora_pl.sources import load_hub_dataset, looks_like_local_path

_SPLIT_STEMS = {"train": ("train",), "val": ("val", "validation"), "validation": ("val", "validation"), "test": ("test",)}


def load_instruction_records(data_path: str, split: str) -> list[dict[str, str]]:
    """Validated ``{instruction, input, output[, task]}`` records of ``split``.

    ``data_path`` is a file, a directory holding ``{split}.json[l]`` (``val`` may be
    ``validation``), or a hub dataset name (loaded with ``split``).
    """
    if looks_like_local_path(data_path):
        path = Path(data_path).expanduser()
        if path.is_dir():
            stems = _SPLIT_STEMS.get(split, (split,))
            found = [path / f"{s}{x}" for s in stems for x in (".json", ".jsonl") if (path / f"{s}{x}").is_file()]
            if not found:
                raise EvaluationDataError(f"{path}: no {'|'.join(stems)}.json[l] file for split {split!r}")
            path = found[0]
        rows, source = read_records(path), str(path)
    else:
        rows, source = load_hub_dataset(data_path, None, split, error=EvaluationDataError), f"hub dataset {data_path!r} (split={split!r})"
    records = []
    for i, row in enumerate(rows):
        where = f"{source}: row {i} (0-based)"
        record = {
            "instruction": require_text(row, "instruction", where),
            "input": "" if row.get("input") is None else require_text(row, "input", where, allow_empty=True),
            "output": require_text(row, "output", where),
        }
        if isinstance(row.get("task"), str) and row["task"]:
            record["task"] = row["task"]
        records.append(record)
    if not records:
        raise EvaluationDataError(f"{source}: no records")
    return records


class _InstructionTask(EvaluationTask):
    def __init__(self, data_path: str, split: str, prompt_template: str, max_source_length: int,
                 name: str | None, limit: int | None) -> None:
        super().__init__(name, limit)
        get_template(prompt_template)  # unknown names fail at construction
        if max_source_length < 1:
            raise ValueError(f"max_source_length={max_source_length} must be >= 1")
        self.data_path = data_path
        self.split = split
        self.prompt_template = prompt_template
        self.max_source_length = max_source_length
        self.records: list[dict[str, str]] = []

    def _load(self) -> None:
        self.records = self._limited(load_instruction_records(self.data_path, self.split))

    def num_examples(self) -> int:
        return len(self.records)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "data_path": self.data_path, "split": self.split,
                "prompt_template": self.prompt_template, "max_source_length": self.max_source_length}


class InstructionPerplexity(_InstructionTask):
    """Response loss and perplexity on an instruction set, per token over the whole set.

    Metrics: ``response_loss`` (mean cross-entropy of the response tokens and EOS, the training
    objective), ``response_ppl`` (its exponential) and ``ppl`` (perplexity of every token of
    prompt and response after BOS). Accumulated with ``torchmetrics.text.Perplexity``.
    """

    default_name = "instruction_ppl"

    def __init__(self, data_path: str = str(EMBEDDED_DATA_DIR / "instructions"), split: str = "test",
                 prompt_template: str = "alpaca", max_source_length: int = 384, max_target_length: int = 128,
                 name: str | None = None, limit: int | None = None) -> None:
        super().__init__(data_path, split, prompt_template, max_source_length, name, limit)
        if max_target_length < 1:
            raise ValueError(f"max_target_length={max_target_length} must be >= 1")
        self.max_target_length = max_target_length

    def config(self) -> dict[str, Any]:
        return {**super().config(), "max_target_length": self.max_target_length}

    def _evaluate(self, scorer: LanguageModelScorer) -> dict[str, float]:
        data = tokenize_records(self.records, scorer.tokenizer, self.prompt_template, self.max_source_length,
                                self.max_target_length, train_on_source=False)
        collate = InstructionCollator(scorer.pad_id)
        response, everything = Perplexity(ignore_index=IGNORE_INDEX, sync_on_compute=False), Perplexity(
            ignore_index=IGNORE_INDEX, sync_on_compute=False)
        batches = scorer._batches(data.lengths)
        with scorer._progress(len(data), f"{self.name} (loss)") as bar:
            for batch_indices in batches:
                batch = collate([data[i] for i in batch_indices])
                logits = scorer.token_logits(batch)[:, :-1].cpu()
                labels = batch["labels"][:, 1:]
                all_tokens = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, IGNORE_INDEX)
                response.update(logits, labels)
                everything.update(logits, all_tokens)
                bar.update(len(batch_indices))
        response_ppl = float(response.compute())
        return {"response_loss": float(torch.log(torch.tensor(response_ppl, dtype=torch.float64))),
                "response_ppl": response_ppl, "ppl": float(everything.compute())}


def normalize_answer(text: str) -> str:
    """First line, lower-cased, surrounding whitespace and punctuation stripped, inner spaces collapsed."""
    lines = text.strip().splitlines()
    text = lines[0] if lines else ""
    text = text.strip().strip(string.punctuation + " ").lower()
    return re.sub(r"\s+", " ", text)


class GreedyExactMatch(_InstructionTask):
    """Greedy generation compared with the reference ``output`` after :func:`normalize_answer`.

    Metrics: ``exact_match`` and, with a ``task`` field, ``exact_match/<task>``. The
    predictions are kept in ``self.predictions`` (and written to the JSON report by the suite
    when ``keep_predictions`` is set there).

    Args:
        max_new_tokens: generation budget per record (the embedded answers are one word or number).
        normalize: compare normalized texts; ``False`` compares stripped texts exactly.
    """

    default_name = "exact_match"

    def __init__(self, data_path: str = str(EMBEDDED_DATA_DIR / "instructions"), split: str = "test",
                 prompt_template: str = "alpaca", max_source_length: int = 384, max_new_tokens: int = 16,
                 normalize: bool = True, name: str | None = None, limit: int | None = None) -> None:
        super().__init__(data_path, split, prompt_template, max_source_length, name, limit)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
        self.max_new_tokens = max_new_tokens
        self.normalize = normalize
        self.predictions: list[str] = []

    def config(self) -> dict[str, Any]:
        return {**super().config(), "max_new_tokens": self.max_new_tokens, "normalize": self.normalize}

    def _evaluate(self, scorer: LanguageModelScorer) -> dict[str, float]:
        template = get_template(self.prompt_template)
        prompts = [scorer.encode(template.format(r["instruction"], r.get("input")))[: self.max_source_length]
                   for r in self.records]
        generated = scorer.greedy_generate(prompts, self.max_new_tokens, desc=f"{self.name} (generate)")
        self.predictions = [scorer.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in generated]
        clean = normalize_answer if self.normalize else str.strip
        metrics: dict[str, MeanMetric] = defaultdict(lambda: MeanMetric(sync_on_compute=False))
        for record, prediction in zip(self.records, self.predictions):
            hit = float(clean(prediction) == clean(record["output"]))
            metrics["exact_match"].update(hit)
            if "task" in record:
                metrics[f"exact_match/{record['task']}"].update(hit)
        order = sorted(metrics, key=lambda k: (k.count("/"), k))
        return {k: float(metrics[k].compute()) for k in order}
