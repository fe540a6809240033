"""MMLU k-shot multiple choice, scored by the answer letters' logits.

:class:`MMLU` - Hendrycks et al.'s protocol as QLoRA runs it: a k-shot prompt of dev-split
questions of the same subject (``The following are multiple choice questions (with answers)
about {subject}.``), the test question, ``Answer:``; the prediction is the answer letter whose
next-token logit is highest (one forward pass per question).

Records come from a local directory (the embedded layout or the original Hendrycks CSVs) or a
hub dataset such as ``cais/mmlu`` (:func:`load_mmlu_split`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from qblora_pl.evaluation.base import EvaluationDataError, EvaluationTask, outcomes, read_records, require_text
from qblora_pl.evaluation.scoring import LanguageModelScorer
from qblora_pl.paths import EMBEDDED_DATA_DIR
from qblora_pl.sources import load_hub_dataset, looks_like_local_path

LETTERS = ("A", "B", "C", "D")
MMLU_CSV_COLUMNS = ["question", "A", "B", "C", "D", "answer"]


def format_subject(subject: str) -> str:
    return " ".join(subject.split("_"))


def mmlu_question(record: Mapping[str, Any], include_answer: bool) -> str:
    """One question as Hendrycks' ``format_example`` (and lm-eval's ``mmlu`` ``doc_to_text``) writes it."""
    text = record["question"].strip()
    for letter, choice in zip(LETTERS, record["choices"]):
        text += f"\n{letter}. {choice}"
    text += "\nAnswer:"
    if include_answer:
        text += f" {LETTERS[record['label']]}\n\n"
    return text


def mmlu_shots(subject: str, shots: list[Mapping[str, Any]]) -> str:
    """The header and answered shots: the part of the prompt every question of ``subject`` shares."""
    header = f"The following are multiple choice questions (with answers) about {format_subject(subject)}.\n\n"
    return header + "".join(mmlu_question(s, True) for s in shots)


def mmlu_prompt(record: Mapping[str, Any], shots: list[Mapping[str, Any]]) -> str:
    return mmlu_shots(record["subject"], shots) + mmlu_question(record, False)


def check_mmlu_record(row: Mapping[str, Any], where: str, subject: str | None = None) -> dict[str, Any]:
    """Normalize one MMLU-format row to ``{question, choices[4], label 0-3, subject}``.

    Accepts ``choices`` as a list or ``A``..``D`` columns, and ``answer`` as a letter or a 0-based
    index (the ``cais/mmlu`` hub format). Raises :class:`EvaluationDataError` naming ``where``.
    """
    question = require_text(row, "question", where)
    if "choices" in row and row["choices"] is not None:
        choices = row["choices"]
        if not isinstance(choices, (list, tuple)):
            raise EvaluationDataError(f"{where}: 'choices' must be a list of 4 strings, got {type(choices).__name__}")
        choices = list(choices)
        if len(choices) < 4:
            missing = ", ".join(LETTERS[len(choices):])
            raise EvaluationDataError(f"{where}: option(s) {missing} missing: 'choices' has {len(choices)} of 4 entries")
        if len(choices) > 4:
            raise EvaluationDataError(f"{where}: 'choices' has {len(choices)} entries; MMLU questions have 4 (A-D)")
    else:
        choices = [row.get(letter) for letter in LETTERS]
    for letter, choice in zip(LETTERS, choices):
        if choice is None or (isinstance(choice, str) and not choice.strip()):
            raise EvaluationDataError(f"{where}: option {letter} is missing or empty")
        if not isinstance(choice, (str, int, float)):
            raise EvaluationDataError(f"{where}: option {letter} must be text, got {type(choice).__name__}")
    answer = row.get("answer")
    if isinstance(answer, bool) or answer is None:
        raise EvaluationDataError(f"{where}: required field 'answer' is missing or not a letter A-D / index 0-3")
    if isinstance(answer, int):
        if not 0 <= answer < 4:
            raise EvaluationDataError(f"{where}: answer index {answer} is outside the options (0-3 for A-D)")
        label = answer
    else:
        letter = str(answer).strip().upper()
        if letter not in LETTERS:
            raise EvaluationDataError(f"{where}: answer {answer!r} is not one of the options A, B, C, D")
        label = LETTERS.index(letter)
    record_subject = row.get("subject") or subject or "general knowledge"
    if not isinstance(record_subject, str):
        raise EvaluationDataError(f"{where}: 'subject' must be a string, got {type(record_subject).__name__}")
    return {"question": question, "choices": [str(c) for c in choices], "label": label, "subject": record_subject}


def _split_file(directory: Path, split: str) -> Path | None:
    found = [directory / f"{split}{suffix}" for suffix in (".json", ".jsonl", ".csv")]
    found = [p for p in found if p.is_file()]
    if len(found) > 1:
        raise EvaluationDataError(f"{directory}: several files for split {split!r} ({', '.join(p.name for p in found)}); keep one")
    return found[0] if found else None


def load_mmlu_split(source: str, split: str, subjects: list[str] | None = None,
                    hub_config: str = "all") -> list[dict[str, Any]]:
    """Validated MMLU records of one split, from any of the supported layouts.

    * a directory with ``{split}.json|jsonl|csv`` (records: ``question``, ``choices`` or
      ``A``-``D``, ``answer`` letter or index, ``subject``) - the embedded layout;
    * the original Hendrycks layout: ``{source}/{split}/<subject>_{split}.csv``, headerless
      ``question,A,B,C,D,answer`` rows, the subject taken from the file name;
    * a Hugging Face hub dataset such as ``cais/mmlu`` (``question``, ``subject``, ``choices``,
      ``answer`` index): one config per subject when ``subjects`` is given, else ``hub_config``.
    """
    if not looks_like_local_path(source):
        records = []
        for config in subjects or [hub_config]:
            rows = load_hub_dataset(source, config, split, error=EvaluationDataError)
            where = f"hub dataset {source!r} (config={config!r}, split={split!r})"
            records += [check_mmlu_record(r, f"{where}: row {i} (0-based)", subject=config) for i, r in enumerate(rows)]
        return _filter_subjects(records, subjects, source)

    directory = Path(source).expanduser()
    if not directory.is_dir():
        raise EvaluationDataError(f"MMLU data_path {source!r} is not a directory (resolved to {directory.resolve()})")
    single = _split_file(directory, split)
    if single is not None:
        rows = read_records(single)
        records = [check_mmlu_record(r, f"{single}: row {i} (0-based)") for i, r in enumerate(rows)]
        return _filter_subjects(records, subjects, single)
    split_dir = directory / split
    csvs = sorted(split_dir.glob(f"*_{split}.csv")) if split_dir.is_dir() else []
    if not csvs:
        raise EvaluationDataError(f"{directory}: no {split}.json/.jsonl/.csv and no {split}/<subject>_{split}.csv files "
                                  "(the original MMLU layout)")
    records = []
    for path in csvs:
        subject = path.name[: -len(f"_{split}.csv")]
        if subjects is not None and subject not in subjects:
            continue
        rows = read_records(path, csv_fieldnames=MMLU_CSV_COLUMNS)
        records += [check_mmlu_record(r, f"{path}: row {i} (0-based)", subject=subject) for i, r in enumerate(rows)]
    return _filter_subjects(records, subjects, split_dir)


def _filter_subjects(records: list[dict[str, Any]], subjects: list[str] | None, source: Any) -> list[dict[str, Any]]:
    if subjects is None:
        return records
    present = {r["subject"] for r in records}
    unknown = sorted(set(subjects) - present)
    if unknown:
        raise EvaluationDataError(f"{source}: subject(s) {unknown} have no records; present: {sorted(present)}")
    return [r for r in records if r["subject"] in subjects]


def first_per_subject(records: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """The first ``n`` records of each subject, in their original order (a deterministic subset)."""
    seen: dict[str, int] = defaultdict(int)
    kept = []
    for record in records:
        if seen[record["subject"]] < n:
            seen[record["subject"]] += 1
            kept.append(record)
    return kept


class MMLU(EvaluationTask):
    """MMLU-format k-shot multiple choice, scored by the answer letters' next-token logits.

    Metrics: ``acc`` (all questions), ``acc_subject_mean`` (mean of the per-subject accuracies)
    and ``acc/<subject>``.

    Args:
        data_path: a local directory (``dev``/``test`` JSON/JSONL/CSV files, or the original
            ``dev/*_dev.csv`` / ``test/*_test.csv`` layout) or a hub dataset (``cais/mmlu``).
            Default: the embedded MMLU-format set.
        split: the split to evaluate (``test``; ``validation`` on the hub).
        dev_split: the split the k shots come from (the first ``k_shot`` records of the subject).
        k_shot: examples in each prompt (5 in the paper, 0 for zero-shot).
        subjects: evaluate only these subjects (hub: one config each; original CSV layout: the
            ``<subject>_{split}.csv`` files); ``None`` for all.
        hub_config: the hub configuration holding every subject (``all`` for ``cais/mmlu``).
        limit_per_subject: evaluate only the first ``N`` test questions of each subject, in file
            (dataset) order - a fixed subset for CPU budgets, the same questions lm-evaluation-harness
            scores with ``--limit N`` on its per-subject ``mmlu_<subject>`` tasks (it too takes the
            first ``N`` documents of each task). ``None`` for all.
        limit: the first ``N`` questions overall (after ``limit_per_subject``), for quick runs.
    """

    default_name = "mmlu"

    def __init__(self, data_path: str = str(EMBEDDED_DATA_DIR / "mmlu"), split: str = "test", dev_split: str = "dev",
                 k_shot: int = 5, subjects: list[str] | None = None, hub_config: str = "all", name: str | None = None,
                 limit: int | None = None, limit_per_subject: int | None = None) -> None:
        super().__init__(name, limit)
        if k_shot < 0:
            raise ValueError(f"k_shot={k_shot} must be >= 0")
        if limit_per_subject is not None and limit_per_subject < 1:
            raise ValueError(f"limit_per_subject={limit_per_subject} must be >= 1 (or None for every question)")
        self.limit_per_subject = limit_per_subject
        self.data_path = data_path
        self.split = split
        self.dev_split = dev_split
        self.k_shot = k_shot
        self.subjects = list(subjects) if subjects is not None else None
        self.hub_config = hub_config
        self.records: list[dict[str, Any]] = []
        self.shots: dict[str, list[dict[str, Any]]] = {}
        self.scoring: str | None = None  # letter_logits or letter_loglikelihood, set by evaluate

    def _load(self) -> None:
        records = load_mmlu_split(self.data_path, self.split, self.subjects, self.hub_config)
        if self.limit_per_subject is not None:
            records = first_per_subject(records, self.limit_per_subject)
        records = self._limited(records)
        if not records:
            raise EvaluationDataError(f"{self.data_path}: split {self.split!r} has no records")
        shots: dict[str, list[dict[str, Any]]] = {}
        if self.k_shot:
            dev = load_mmlu_split(self.data_path, self.dev_split, self.subjects, self.hub_config)
            by_subject: dict[str, list[dict[str, Any]]] = defaultdict(list)
            for record in dev:
                by_subject[record["subject"]].append(record)
            for subject in sorted({r["subject"] for r in records}):
                have = by_subject.get(subject, [])
                if len(have) < self.k_shot:
                    raise EvaluationDataError(
                        f"{self._dev_source()}: k_shot={self.k_shot} but the {self.dev_split!r} split has only "
                        f"{len(have)} record(s) for subject {subject!r}; lower k_shot or add dev records"
                    )
                shots[subject] = have[: self.k_shot]
        self.records, self.shots = records, shots

    def _dev_source(self) -> str:
        directory = Path(self.data_path).expanduser()
        if directory.is_dir():
            found = _split_file(directory, self.dev_split)
            return str(found or directory / self.dev_split)
        return f"hub dataset {self.data_path!r}"

    def num_examples(self) -> int:
        return len(self.records)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "data_path": self.data_path, "split": self.split, "dev_split": self.dev_split,
                "k_shot": self.k_shot, "subjects": self.subjects, "limit_per_subject": self.limit_per_subject,
                "scoring": self.scoring}

    def prompts(self, scorer: LanguageModelScorer) -> tuple[list[list[int]], list[list[list[int]]], int]:
        """Token ids of each question's prompt, of its four answers (``" A"`` ...), and how many prompts lost shots.

        A prompt longer than the scorer's ``max_length`` drops shots from the end until it fits
        (Hendrycks' ``evaluate.py`` does the same).
        """
        contexts, letters, reduced, _ = self._prompts_and_shared_prefixes(scorer)
        return contexts, letters, reduced

    def _prompts_and_shared_prefixes(self, scorer: LanguageModelScorer,
                                     ) -> tuple[list[list[int]], list[list[list[int]]], int, list[list[int]]]:
        """:meth:`prompts` plus, per question, the ids of its header and shots (the scorer's prefix-cache hint)."""
        contexts, letters, reduced, prefixes = [], [], 0, []
        for record in self.records:
            shots = self.shots.get(record["subject"], [])
            while True:
                text = mmlu_prompt(record, shots)
                ids = scorer.encode(text.rstrip())
                if len(ids) < scorer.max_length or not shots:
                    break
                shots = shots[:-1]
            reduced += len(shots) < len(self.shots.get(record["subject"], []))
            ids_per_letter = []
            for letter in LETTERS:
                context_ids, letter_ids = scorer.encode_pair(text, f" {letter}")
                ids_per_letter.append(letter_ids)
            contexts.append(context_ids)
            letters.append(ids_per_letter)
            prefixes.append(scorer.encode(mmlu_shots(record["subject"], shots)))
        return contexts, letters, reduced, prefixes

    def letter_logprobs(self, scorer: LanguageModelScorer) -> tuple[torch.Tensor, int]:
        """``[questions, 4]`` log-probabilities of the answers ``" A"`` .. ``" D"``, and the prompts that lost shots.

        Where every answer is one token (Llama, Mistral, Qwen, GPT-2 tokenizers) this is one forward
        pass per question reading the four letters' next-token logits (the MMLU / QLoRA protocol).
        A tokenizer that splits ``" A"`` into several tokens gets each answer's summed
        log-likelihood instead (lm-evaluation-harness's protocol; the same number for one token).
        The header and shots of a subject are the scorer's shared-prefix hint: with its
        ``prefix_cache`` they run once per subject instead of once per question.
        """
        contexts, letters, reduced, prefixes = self._prompts_and_shared_prefixes(scorer)
        desc = f"{self.name} ({self.k_shot}-shot)"
        if all(len(ids) == 1 for row in letters for ids in row):
            self.scoring = "letter_logits"
            scores = scorer.next_token_logprobs(contexts, [[ids[0] for ids in row] for row in letters], desc=desc,
                                                prefixes=prefixes)
            return torch.stack(scores), reduced
        self.scoring = "letter_loglikelihood"
        flat = scorer.loglikelihoods([(c, ids) for c, row in zip(contexts, letters) for ids in row], desc=desc,
                                     prefixes=[p for p in prefixes for _ in LETTERS])
        return torch.tensor([ll for ll, _ in flat]).view(len(contexts), len(LETTERS)), reduced

    def predict(self, scorer: LanguageModelScorer) -> tuple[torch.Tensor, int]:
        """Predicted answer index (0-3) per question, and how many prompts lost shots to ``max_length``."""
        scores, reduced = self.letter_logprobs(scorer)
        return scores.argmax(-1), reduced

    def _evaluate(self, scorer: LanguageModelScorer) -> dict[str, float]:
        predictions, reduced = self.predict(scorer)
        labels = torch.tensor([r["label"] for r in self.records])
        accuracy = MulticlassAccuracy(num_classes=4, average="micro", sync_on_compute=False)
        per_subject: dict[str, MeanMetric] = {}
        accuracy.update(predictions, labels)
        for record, prediction, label in zip(self.records, predictions, labels):
            metric = per_subject.setdefault(record["subject"], MeanMetric(sync_on_compute=False))
            metric.update((prediction == label).float())
        subject_acc = {s: float(m.compute()) for s, m in sorted(per_subject.items())}
        self.per_example = {"acc": outcomes(predictions == labels)}
        results = {"acc": float(accuracy.compute()), "acc_subject_mean": sum(subject_acc.values()) / len(subject_acc)}
        results.update({f"acc/{s}": v for s, v in subject_acc.items()})
        if reduced:
            results["prompts_with_fewer_shots"] = float(reduced)
        return results
