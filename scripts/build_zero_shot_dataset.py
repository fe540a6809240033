#!/usr/bin/env python
"""Build the embedded zero-shot multiple-choice set ``qblora_pl/assets/data/zero_shot/test.json``.

ARC-style records (``Question: ...\\nAnswer:`` then a short choice) derived from the held-out
instruction test split (``instructions/test.json``), so zero-shot log-likelihood scoring
(lm-evaluation-harness's ``multiple_choice``: ``acc`` and length-normalised ``acc_norm``) runs
offline on the default job. For each record of a knowledge or procedural task the correct
choice is the record's ``output``; the distractors are outputs of other test records of the
same task (distinct, never equal to the answer). The ``part_of_speech`` choices are the four
classes in a fixed order. ``multiple_choice`` (already lettered) and ``reverse_word`` records
are skipped. Choices differ in length, so ``acc`` and ``acc_norm`` can disagree, as on
HellaSwag.

Record: ``{"query", "choices", "gold" (0-based index), "task", "source_row"}`` (``source_row``:
the row in ``instructions/test.json``).

Usage::

    python scripts/build_zero_shot_dataset.py --seed 0     # deterministic; re-running gives the same file
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = REPO_ROOT / "qblora_pl" / "assets" / "data"
PARTS_OF_SPEECH = ["noun", "verb", "adjective", "adverb"]

QUESTIONS = {
    "synonym": 'Which word means the same as "{input}"?',
    "antonym": 'What is the opposite of "{input}"?',
    "hypernym": '"{input}" is a kind of what?',
    "definition_to_word": "Which word is defined as {input}?",
    "addition": "{instruction}",
    "count_letters": 'How many letters are in the word "{input}"?',
    "part_of_speech": 'What part of speech is the word "{input}"?',
}


def build(records: list[dict], seed: int, num_choices: int = 4) -> list[dict]:
    rng = random.Random(seed)
    by_task: dict[str, list[str]] = {}
    for record in records:
        by_task.setdefault(record["task"], [])
        if record["output"] not in by_task[record["task"]]:
            by_task[record["task"]].append(record["output"])
    out = []
    for row, record in enumerate(records):
        task = record["task"]
        if task not in QUESTIONS:
            continue
        query = "Question: " + QUESTIONS[task].format(instruction=record["instruction"], input=record["input"]) + "\nAnswer:"
        answer = record["output"]
        if task == "part_of_speech":
            if answer not in PARTS_OF_SPEECH:
                continue
            choices = list(PARTS_OF_SPEECH)
        else:
            pool = [o for o in by_task[task] if o.lower() != answer.lower()]
            if len(pool) < num_choices - 1:
                continue
            choices = rng.sample(pool, num_choices - 1)
            choices.insert(rng.randrange(num_choices), answer)
        out.append({"query": query, "choices": choices, "gold": choices.index(answer), "task": task, "source_row": row})
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--source", type=Path, default=DATA_DIR / "instructions" / "test.json")
    parser.add_argument("--out", type=Path, default=DATA_DIR / "zero_shot" / "test.json")
    args = parser.parse_args(argv)
    records = json.loads(args.source.read_text())
    built = build(records, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(built, indent=1, ensure_ascii=False) + "\n")
    counts: dict[str, int] = {}
    for record in built:
        counts[record["task"]] = counts.get(record["task"], 0) + 1
    print(f"wrote {len(built)} records to {args.out}: {counts}")


if __name__ == "__main__":
    main()
