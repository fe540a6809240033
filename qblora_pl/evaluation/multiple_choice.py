"""Multiple-choice tasks: MMLU k-shot (answer-letter logits) and zero-shot choice log-likelihood.

* :class:`MMLU` - Hendrycks et al.'s protocol as QLoRA runs it: a k-shot prompt of dev-split
  questions of the same subject (``The following are multiple choice questions (with answers)
  about {subject}.``), the test question, ``Answer:``; the prediction is the answer letter whose
  next-token logit is highest (one forward pass per question).
* :class:`ZeroShotMultipleChoice` - lm-evaluation-harness's ``multiple_choice`` output type:
  the log-likelihood of ``" " + choice`` after the query, ``acc`` = argmax of the sums and
  ``acc_norm`` = argmax of the sums divided by each choice's length in characters. Record
  formats for HellaSwag, PIQA, ARC and BoolQ reproduce the harness's prompts.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from qblora_pl.evaluation.base import (
    EvaluationDataError,
    EvaluationTask,
    load_hub_rows,
    looks_like_local_path,
    read_records,
    require_text,
)
from qblora_pl.evaluation.scoring import LanguageModelScorer
from qblora_pl.paths import EMBEDDED_DATA_DIR

LETTERS = ("A", "B", "C", "D")
MMLU_CSV_COLUMNS = ["question", "A", "B", "C", "D", "answer"]


# --------------------------------------------------------------------------------------------
# MMLU
# --------------------------------------------------------------------------------------------


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


def mmlu_prompt(record: Mapping[str, Any], shots: list[Mapping[str, Any]]) -> str:
    header = f"The following are multiple choice questions (with answers) about {format_subject(record['subject'])}.\n\n"
    return header + "".join(mmlu_question(s, True) for s in shots) + mmlu_question(record, False)


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
            rows = load_hub_rows(source, config, split)
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
        subjects: evaluate only these subjects (hub: one config each); ``None`` for all.
        hub_config: the hub configuration holding every subject (``all`` for ``cais/mmlu``).
    """

    default_name = "mmlu"

    def __init__(self, data_path: str = str(EMBEDDED_DATA_DIR / "mmlu"), split: str = "test", dev_split: str = "dev",
                 k_shot: int = 5, subjects: list[str] | None = None, hub_config: str = "all", name: str | None = None,
                 limit: int | None = None) -> None:
        super().__init__(name, limit)
        if k_shot < 0:
            raise ValueError(f"k_shot={k_shot} must be >= 0")
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
        records = self._limited(load_mmlu_split(self.data_path, self.split, self.subjects, self.hub_config))
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
                "k_shot": self.k_shot, "subjects": self.subjects, "scoring": self.scoring}

    def prompts(self, scorer: LanguageModelScorer) -> tuple[list[list[int]], list[list[list[int]]], int]:
        """Token ids of each question's prompt, of its four answers (``" A"`` ...), and how many prompts lost shots.

        A prompt longer than the scorer's ``max_length`` drops shots from the end until it fits
        (Hendrycks' ``evaluate.py`` does the same).
        """
        contexts, letters, reduced = [], [], 0
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
        return contexts, letters, reduced

    def letter_logprobs(self, scorer: LanguageModelScorer) -> tuple[torch.Tensor, int]:
        """``[questions, 4]`` log-probabilities of the answers ``" A"`` .. ``" D"``, and the prompts that lost shots.

        Where every answer is one token (Llama, Mistral, Qwen, GPT-2 tokenizers) this is one forward
        pass per question reading the four letters' next-token logits (the MMLU / QLoRA protocol).
        A tokenizer that splits ``" A"`` into several tokens gets each answer's summed
        log-likelihood instead (lm-evaluation-harness's protocol; the same number for one token).
        """
        contexts, letters, reduced = self.prompts(scorer)
        desc = f"{self.name} ({self.k_shot}-shot)"
        if all(len(ids) == 1 for row in letters for ids in row):
            self.scoring = "letter_logits"
            scores = scorer.next_token_logprobs(contexts, [[ids[0] for ids in row] for row in letters], desc=desc)
            return torch.stack(scores), reduced
        self.scoring = "letter_loglikelihood"
        flat = scorer.loglikelihoods([(c, ids) for c, row in zip(contexts, letters) for ids in row], desc=desc)
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
        results = {"acc": float(accuracy.compute()), "acc_subject_mean": sum(subject_acc.values()) / len(subject_acc)}
        results.update({f"acc/{s}": v for s, v in subject_acc.items()})
        if reduced:
            results["prompts_with_fewer_shots"] = float(reduced)
        return results


# --------------------------------------------------------------------------------------------
# Zero-shot multiple choice
# --------------------------------------------------------------------------------------------


def _hellaswag_preprocess(text: str) -> str:
    # lm-eval's tasks/hellaswag/utils.py: drop WikiHow artifacts and bracketed markers.
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _generic(row: Mapping[str, Any]) -> tuple[Any, Any, Any]:
    return row.get("query"), row.get("choices"), row.get("gold")


def _hellaswag(row: Mapping[str, Any]) -> tuple[Any, Any, Any]:
    ctx = f"{row.get('ctx_a', '')} {str(row.get('ctx_b', '')).capitalize()}"
    query = _hellaswag_preprocess(f"{row.get('activity_label', '')}: {ctx}")
    endings = row.get("endings")
    choices = [_hellaswag_preprocess(e) if isinstance(e, str) else e for e in endings] if isinstance(endings, list) else endings
    label = row.get("label")
    return query, choices, int(label) if isinstance(label, str) and label.strip().isdigit() else label


def _piqa(row: Mapping[str, Any]) -> tuple[Any, Any, Any]:
    return f"Question: {row.get('goal')}\nAnswer:", [row.get("sol1"), row.get("sol2")], row.get("label")


def _arc(row: Mapping[str, Any]) -> tuple[Any, Any, Any]:
    choices = row.get("choices") or {}
    texts, labels = choices.get("text"), choices.get("label")
    key = row.get("answerKey")
    gold = labels.index(key) if isinstance(labels, list) and key in labels else key
    return f"Question: {row.get('question')}\nAnswer:", texts, gold


def _boolq(row: Mapping[str, Any]) -> tuple[Any, Any, Any]:
    answer = row.get("answer", row.get("label"))
    gold = int(answer) if isinstance(answer, bool) else answer
    return f"{row.get('passage')}\nQuestion: {row.get('question')}?\nAnswer:", ["no", "yes"], gold


RECORD_FORMATS: dict[str, Callable[[Mapping[str, Any]], tuple[Any, Any, Any]]] = {
    "generic": _generic, "hellaswag": _hellaswag, "piqa": _piqa, "arc": _arc, "boolq": _boolq,
}


def check_choice_record(query: Any, choices: Any, gold: Any, where: str) -> dict[str, Any]:
    """Normalize one zero-shot record to ``{query, choices, gold index}``; errors name ``where``."""
    if not isinstance(query, str) or not query.strip():
        raise EvaluationDataError(f"{where}: the query/context is missing or empty")
    if not isinstance(choices, (list, tuple)) or len(choices) < 2:
        raise EvaluationDataError(f"{where}: 'choices' must be a list of at least 2 strings, got {choices!r:.80}")
    for j, choice in enumerate(choices):
        if not isinstance(choice, str) or not choice.strip():
            raise EvaluationDataError(f"{where}: option {j} ({_letter(j)}) is missing or empty")
    if isinstance(gold, bool) or gold is None:
        raise EvaluationDataError(f"{where}: the gold answer is missing (an index 0-{len(choices) - 1} or a letter)")
    if isinstance(gold, str):
        letter = gold.strip().upper()
        if len(letter) == 1 and "A" <= letter <= "Z":
            gold = ord(letter) - ord("A")
        elif letter.isdigit():
            gold = int(letter)
        else:
            raise EvaluationDataError(f"{where}: gold answer {gold!r} is neither an index nor a letter")
    if not isinstance(gold, int) or not 0 <= gold < len(choices):
        options = ", ".join(_letter(j) for j in range(len(choices)))
        raise EvaluationDataError(f"{where}: gold answer {gold!r} is outside the {len(choices)} options ({options} / 0-{len(choices) - 1})")
    return {"query": query, "choices": list(choices), "gold": gold}


def _letter(index: int) -> str:
    return chr(ord("A") + index) if index < 26 else str(index)


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
            ``choices``, ``gold`` index or letter), ``hellaswag``, ``piqa``, ``arc``, ``boolq``.
        hf_name: hub configuration (``ARC-Easy``).
        hf_split: hub split (``validation``).
        target_delimiter: text between the query and each choice (lm-eval's default ``" "``).
    """

    default_name = "zero_shot"

    def __init__(self, data_path: str = str(EMBEDDED_DATA_DIR / "zero_shot" / "test.json"),
                 record_format: Literal["generic", "hellaswag", "piqa", "arc", "boolq"] = "generic",
                 hf_name: str | None = None, hf_split: str = "validation", target_delimiter: str = " ",
                 name: str | None = None, limit: int | None = None) -> None:
        super().__init__(name, limit)
        if record_format not in RECORD_FORMATS:
            raise ValueError(f"record_format={record_format!r} is not one of {sorted(RECORD_FORMATS)}")
        self.data_path = data_path
        self.record_format = record_format
        self.hf_name = hf_name
        self.hf_split = hf_split
        self.target_delimiter = target_delimiter
        self.records: list[dict[str, Any]] = []

    def _load(self) -> None:
        convert = RECORD_FORMATS[self.record_format]
        if looks_like_local_path(self.data_path):
            rows = read_records(self.data_path)
            source = str(Path(self.data_path).expanduser())
        else:
            rows = load_hub_rows(self.data_path, self.hf_name, self.hf_split)
            source = f"hub dataset {self.data_path!r} (config={self.hf_name!r}, split={self.hf_split!r})"
        records = []
        for i, row in enumerate(rows):
            where = f"{source}: row {i} (0-based)"
            record = check_choice_record(*convert(row), where)
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
        for record, lls in zip(self.records, self.choice_loglikelihoods(scorer)):
            lls_t = torch.tensor(lls, dtype=torch.float64)
            lengths = torch.tensor([float(len(c)) for c in record["choices"]], dtype=torch.float64)
            hit = float(int(lls_t.argmax()) == record["gold"])
            hit_norm = float(int((lls_t / lengths).argmax()) == record["gold"])
            for suffix in ("", f"/{record['task']}") if "task" in record else ("",):
                metrics["acc" + suffix].update(hit)
                metrics["acc_norm" + suffix].update(hit_norm)
        order = sorted(metrics, key=lambda k: (k.count("/"), k))
        return {k: float(metrics[k].compute()) for k in order}
