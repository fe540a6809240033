"""Record parsers of zero-shot multiple choice: one row of a benchmark file -> query, choices, gold.

Formats for HellaSwag, PIQA, ARC and BoolQ reproduce lm-evaluation-harness's prompts;
``generic`` reads ``query`` / ``choices`` / ``gold``. :func:`detect_record_format` picks one from
a row's keys (``record_format: auto``) and :func:`check_choice_record` validates the result.
Used by :class:`~qblora_pl.evaluation.zero_shot.ZeroShotMultipleChoice`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from qblora_pl.evaluation.base import EvaluationDataError


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
