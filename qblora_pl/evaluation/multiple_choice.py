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

from qblora_pl.evaluation.base import EvaluationDataError, EvaluationTask, outcomes, read_records, require_text
from qblora_pl.evaluation.scoring import LanguageModelScorer
from qblora_pl.paths import EMBEDDED_DATA_DIR
from qblora_pl.sources import load_hub_dataset, looks_like_local_path

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
    """ARC in either layout, as lm-eval's ``arc_easy`` / ``arc_challenge`` tasks prompt it.

    * the official AI2 JSONL: ``{"id", "question": {"stem", "choices": [{"text", "label"}, ...]},
      "answerKey"}``;
    * the hub's flattened rows (``allenai/ai2_arc``): ``{"id", "question", "choices": {"text": [...],
      "label": [...]}, "answerKey"}``.

    Labels are letters (``A``..``E``) or digits (``1``..``5``); 3 to 5 choices occur. The gold
    index is the position of ``answerKey`` among the labels (lm-eval's
    ``choices.label.index(answerKey)``), so the key must be one of the labels.
    """
    question = row.get("question")
    if isinstance(question, Mapping):  # official layout
        stem, raw = question.get("stem"), question.get("choices")
        if not isinstance(raw, list) or not all(isinstance(c, Mapping) for c in raw):
            raise _RowError(f"'question.choices' must be a list of {{text, label}} objects, got {raw!r:.80}")
        texts, labels = [c.get("text") for c in raw], [c.get("label") for c in raw]
        where = "'question.stem'"
    else:  # hub layout
        choices = row.get("choices")
        if not isinstance(choices, Mapping):
            raise _RowError("neither the official ARC layout ('question' with 'stem' and 'choices') nor the hub "
                            f"layout ('question' text and 'choices' with 'text' and 'label' lists): got keys {sorted(row)}")
        stem, texts, labels = question, choices.get("text"), choices.get("label")
        where = "'question'"
    if not isinstance(stem, str) or not stem.strip():
        raise _RowError(f"the question text {where} is missing or empty")
    if not isinstance(labels, list) or not all(isinstance(x, str) and x.strip() for x in labels):
        raise _RowError(f"every choice needs a text label (letters or digits), got labels {labels!r:.80}")
    if not isinstance(texts, list) or len(texts) != len(labels):
        raise _RowError(f"{len(labels)} labels but choice texts {texts!r:.80}")
    if len(set(labels)) != len(labels):
        raise _RowError(f"repeated choice labels {labels}")
    key = row.get("answerKey")
    if not isinstance(key, str) or key.strip() not in labels:
        raise _RowError(f"answerKey {key!r} is not one of the choice labels {', '.join(labels)}")
    return f"Question: {stem}\nAnswer:", texts, labels.index(key.strip())


def _boolq(row: Mapping[str, Any]) -> tuple[Any, Any, Any]:
    answer = row.get("answer", row.get("label"))
    gold = int(answer) if isinstance(answer, bool) else answer
    return f"{row.get('passage')}\nQuestion: {row.get('question')}?\nAnswer:", ["no", "yes"], gold


RECORD_FORMATS: dict[str, Callable[[Mapping[str, Any]], tuple[Any, Any, Any]]] = {
    "generic": _generic, "hellaswag": _hellaswag, "piqa": _piqa, "arc": _arc, "boolq": _boolq,
}

#: ``record_format: auto`` picks the first format whose keys the first row has.
_FORMAT_KEYS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("generic", ("query", "choices")), ("arc", ("question", "answerKey")), ("hellaswag", ("ctx_a", "endings")),
    ("piqa", ("goal", "sol1", "sol2")), ("boolq", ("passage", "question")),
)


class _RowError(Exception):
    """A record converter's complaint about one row; the caller adds the file and row."""


def detect_record_format(row: Mapping[str, Any], where: str) -> str:
    """The record format of a row, from its keys (``record_format: auto``)."""
    for name, keys in _FORMAT_KEYS:
        if all(k in row for k in keys):
            return name
    expected = "; ".join(f"{name}: {', '.join(keys)}" for name, keys in _FORMAT_KEYS)
    raise EvaluationDataError(f"{where}: cannot tell the record format from the keys {sorted(row)}; expected ({expected}) "
                              "or set record_format")


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
