#!/usr/bin/env python
"""Build the instruction and multiple-choice datasets shipped in ``qblora_pl/assets/data``.

Offline and seeded. The knowledge tasks come from WordNet 3.0 (Debian package
``wordnet-base``), restricted to the synsets the embedded model was pretrained on
(sense-tagged synsets whose corpus paragraph is not in the held-out test text; see
``scripts/build_base_model.py``), so a fine-tuned model can answer them from what it saw
in pretraining. A few procedural tasks (arithmetic, letter counting, reversal) need no
knowledge at all.

Writes::

    instructions/{train,val,test}.json   Alpaca records {"instruction", "input", "output", "task"}
    mmlu/{dev,test}.json                 {"question", "choices"[4], "answer" A-D, "subject"}
    README.md

Usage::

    apt-get update && apt-get install -y wordnet-base
    python scripts/build_default_dataset.py --seed 0

Nothing runs at import time; ``main()`` is the command-line entry point.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build_base_model as bbm  # noqa: E402  (shares the WordNet parser and held-out rule)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "qblora_pl" / "assets" / "data"
LETTERS = "ABCD"

# instruction tasks: name -> (train, val, test) counts
TASK_COUNTS = {
    "part_of_speech": (700, 50, 50),
    "synonym": (800, 60, 60),
    "antonym": (450, 40, 40),
    "hypernym": (650, 50, 50),
    "definition_to_word": (450, 40, 40),
    "addition": (350, 25, 25),
    "count_letters": (300, 20, 20),
    "reverse_word": (300, 20, 20),
}
POS_CHOICES = ("noun", "verb", "adjective", "adverb")
MC_COUNTS = (200, 10, 10)  # multiple_choice instruction records per MMLU subject
MC_INSTR = "Answer the following multiple choice question with the letter of the correct answer (A, B, C or D)."
MMLU_SUBJECTS = ("part_of_speech", "synonyms", "antonyms", "hypernyms", "definitions", "arithmetic")
MMLU_DEV_PER_SUBJECT = 5
MMLU_TEST_PER_SUBJECT = 70

_WORD_RE = re.compile(r"^[a-z]{3,14}$")


def _ok_word(w: str) -> bool:
    return bool(_WORD_RE.match(w))


def _short_definition(defn: str, max_words: int = 24) -> str | None:
    words = defn.split()
    if not words or len(words) > max_words:
        return None
    return defn


class Knowledge:
    """Word facts from the pretraining synsets (selected, not held out)."""

    def __init__(self, wordnet_dir, heldout_permille: int = 20, min_count: int = 1):
        synsets = bbm.parse_wordnet(wordnet_dir)
        self.synsets = synsets
        # part-of-speech sets over the whole WordNet (to find unambiguous words)
        all_pos: dict[str, set[str]] = defaultdict(set)
        for s in synsets.values():
            for w in s.words:
                all_pos[w.lower()].add(s.pos_name)
        self.known: list[bbm.Synset] = []
        for s in bbm.select_synsets(synsets, min_count):
            text = bbm.clean_text(bbm.render_synset(s, synsets))
            if not bbm.is_heldout(text, heldout_permille):
                self.known.append(s)
        freq: dict[str, int] = defaultdict(int)
        for s in self.known:
            for w, c in zip(s.words, s.word_counts):
                freq[w.lower()] += c
        self.freq = freq
        # facts, each list sorted for determinism
        self.pos_words = sorted(
            (w, next(iter(all_pos[w])))
            for w in {w.lower() for s in self.known for w in s.words}
            if _ok_word(w) and len(all_pos[w]) == 1 and freq[w] >= 1
        )
        syn: dict[str, str] = {}
        for s in self.known:  # most frequent sense first -> its best synonym
            cands = [w for w in s.words if _ok_word(w)]
            for w in cands:
                others = sorted((o for o in cands if o != w), key=lambda o: (-freq[o], o))
                if others and (w not in syn or s.count > syn[w][1]):
                    syn[w] = (others[0], s.count)
        self.synonyms = sorted((w, o) for w, (o, _) in syn.items())
        self.synonym_sets = defaultdict(set)
        for s in synsets.values():
            low = [w.lower() for w in s.words]
            for w in low:
                self.synonym_sets[w].update(low)
        ants = {}
        for s in self.known:
            for a, b in bbm.synset_antonym_pairs(s, synsets):
                if _ok_word(a) and _ok_word(b):
                    ants.setdefault(a, b)
        self.antonyms = sorted(ants.items())
        hyp = {}
        for s in self.known:
            if s.pos != "n" or not s.hypernyms or s.hypernyms[0] not in synsets:
                continue
            h = synsets[s.hypernyms[0]].words[0]
            w = s.words[0]
            if _ok_word(w) and len(h) <= 24 and w not in hyp:
                hyp[w] = h
        self.hypernyms = sorted(hyp.items())
        defs = {}
        for s in self.known:
            w = s.words[0]
            d = _short_definition(s.definition)
            if _ok_word(w) and d and w not in d and w not in defs:
                defs[w] = (d, s.pos_name)
        self.definitions = sorted((w, d, p) for w, (d, p) in defs.items())
        self.words_by_pos: dict[str, list[str]] = defaultdict(list)
        for w, p in self.pos_words:
            self.words_by_pos[p].append(w)


# ---------------------------------------------------------------------------
# instruction records
# ---------------------------------------------------------------------------
def _rec(task, instruction, inp, output):
    return {"instruction": instruction, "input": inp, "output": output, "task": task}


POS_INSTR = ["What part of speech is the following word?", "Which part of speech is this word: noun, verb, adjective or adverb?"]
SYN_INSTR = ["Give a synonym of the following word.", "Write another word that means the same as this word."]
ANT_INSTR = ["Give the antonym of the following word.", "What is the opposite of this word?"]
HYP_INSTR = ["What is this a kind of?", "Name the broader category of the following noun."]
DEF_INSTR = ["Which word matches this definition?", "Give the word that is defined as follows."]


def _items_for(task: str, k: Knowledge, rng: random.Random):
    """All candidate records of a task (before splitting), shuffled."""
    items = []
    if task == "part_of_speech":
        by = defaultdict(list)
        for w, p in k.pos_words:
            by[p].append((w, p))
        # balance the four parts of speech
        pools = [sorted(v) for _, v in sorted(by.items())]
        for pool in pools:
            rng.shuffle(pool)
        while any(pools):
            for pool in pools:
                if pool:
                    w, p = pool.pop()
                    items.append((w, _rec(task, rng.choice(POS_INSTR), w, p)))
        return items
    if task == "synonym":
        items = [(w, _rec(task, rng.choice(SYN_INSTR), w, o)) for w, o in k.synonyms if k.freq[w] >= 1]
    elif task == "antonym":
        items = [(w, _rec(task, rng.choice(ANT_INSTR), w, o)) for w, o in k.antonyms]
    elif task == "hypernym":
        items = [(w, _rec(task, rng.choice(HYP_INSTR), w, h)) for w, h in k.hypernyms]
    elif task == "definition_to_word":
        items = [(w, _rec(task, rng.choice(DEF_INSTR), f"({p}) {d}", w)) for w, d, p in k.definitions]
    elif task == "addition":
        seen = set()
        while len(items) < 2000:
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            if (a, b) in seen:
                continue
            seen.add((a, b))
            items.append((f"{a}+{b}", _rec(task, f"What is {a} + {b}?", "", str(a + b))))
    elif task == "count_letters":
        words = sorted({w for w, _ in k.pos_words if 3 <= len(w) <= 10})
        items = [(w, _rec(task, "How many letters are in the following word?", w, str(len(w)))) for w in words]
    elif task == "reverse_word":
        words = sorted({w for w, _ in k.pos_words if 3 <= len(w) <= 7})
        items = [(w, _rec(task, "Write the following word backwards.", w, w[::-1])) for w in words]
    rng.shuffle(items)
    return items


def build_instructions(k: Knowledge, seed: int = 0, counts=TASK_COUNTS, mc_counts=MC_COUNTS):
    """Split each task by key (a word never appears in two splits of the same task).

    Returns ``(splits, mc_keys)``: ``mc_keys[subject]`` are the keys of the
    multiple-choice records, which the MMLU sets then avoid.
    """
    splits = {"train": [], "val": [], "test": []}
    for ti, (task, (n_tr, n_va, n_te)) in enumerate(counts.items()):
        rng = random.Random(seed * 1000 + ti)
        items = _items_for(task, k, rng)
        # dedupe keys
        seen, uniq = set(), []
        for key, r in items:
            if key not in seen:
                seen.add(key)
                uniq.append(r)
        need = n_tr + n_va + n_te
        if len(uniq) < need:
            raise ValueError(f"task {task}: only {len(uniq)} items, need {need}")
        splits["test"] += uniq[:n_te]
        splits["val"] += uniq[n_te : n_te + n_va]
        splits["train"] += uniq[n_te + n_va : need]
    # MMLU-format questions as instructions: teaches the answer-with-a-letter format
    mc_keys: dict[str, set] = {}
    n_tr, n_va, n_te = mc_counts
    for si, subject in enumerate(MMLU_SUBJECTS):
        rng = random.Random(seed * 1000 + 500 + si)
        keys: set = set()
        for split, n in (("test", n_te), ("val", n_va), ("train", n_tr)):
            for it in _mmlu_items(subject, k, rng, n, keys):
                splits[split].append(_rec("multiple_choice", MC_INSTR, format_mc_question(it), it["answer"]))
        mc_keys[subject] = keys
    rng = random.Random(seed)
    for v in splits.values():
        rng.shuffle(v)
    return splits, mc_keys


def format_mc_question(item: dict) -> str:
    return item["question"] + "\n" + "\n".join(f"{L}. {c}" for L, c in zip(LETTERS, item["choices"]))


# ---------------------------------------------------------------------------
# MMLU-style multiple choice
# ---------------------------------------------------------------------------
def _mc(question, correct, distractors, subject, rng):
    choices = [correct, *distractors]
    rng.shuffle(choices)
    return {"question": question, "choices": choices, "answer": LETTERS[choices.index(correct)], "subject": subject}


def _distractors(rng, pool, exclude: set[str], n=3):
    out = []
    while len(out) < n:
        c = rng.choice(pool)
        if c.lower() not in exclude and c not in out:
            out.append(c)
    return out


def _mmlu_items(subject: str, k: Knowledge, rng: random.Random, n: int, avoid: set):
    items = []
    all_words = [w for w, _ in k.pos_words]
    tries = 0
    while len(items) < n:
        tries += 1
        if tries > 100 * n:
            raise ValueError(f"cannot build {n} questions for {subject}")
        if subject == "part_of_speech":
            # balanced over the four classes; choices in the fixed order noun, verb,
            # adjective, adverb (as MMLU does for fixed option sets)
            p = rng.choice(POS_CHOICES)
            w = rng.choice(k.words_by_pos[p])
            key = w
            if key in avoid:
                continue
            q = f'Which part of speech is the word "{w}"?'
            it = {"question": q, "choices": list(POS_CHOICES), "answer": LETTERS[POS_CHOICES.index(p)], "subject": subject}
        elif subject == "synonyms":
            w, o = rng.choice(k.synonyms)
            key = w
            if key in avoid:
                continue
            excl = k.synonym_sets[w] | k.synonym_sets[o] | {w, o}
            it = _mc(f'Which word is a synonym of "{w}"?', o, _distractors(rng, all_words, excl), subject, rng)
        elif subject == "antonyms":
            w, o = rng.choice(k.antonyms)
            key = w
            if key in avoid:
                continue
            excl = k.synonym_sets[w] | k.synonym_sets[o] | {w, o}
            it = _mc(f'Which word is the opposite of "{w}"?', o, _distractors(rng, all_words, excl), subject, rng)
        elif subject == "hypernyms":
            w, h = rng.choice(k.hypernyms)
            key = w
            if key in avoid:
                continue
            pool = sorted({x for _, x in k.hypernyms})
            it = _mc(f'"{w.capitalize()}" is a kind of what?', h, _distractors(rng, pool, {h.lower(), w}), subject, rng)
        elif subject == "definitions":
            w, d, p = rng.choice(k.definitions)
            key = w
            if key in avoid:
                continue
            pool = k.words_by_pos.get(p) or all_words
            it = _mc(f'Which word means "{d}"?', w, _distractors(rng, pool, k.synonym_sets[w] | {w}), subject, rng)
        else:  # arithmetic
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            key = f"{a}+{b}"
            if key in avoid:
                continue
            s = a + b
            wrong = set()
            while len(wrong) < 3:
                c = s + rng.choice([-11, -10, -9, -2, -1, 1, 2, 9, 10, 11])
                if c >= 0 and c != s:
                    wrong.add(c)
            it = _mc(f"What is {a} + {b}?", str(s), [str(c) for c in sorted(wrong)], subject, rng)
        avoid.add(key)
        items.append(it)
    return items


SUBJECT_TASK = {
    "part_of_speech": "part_of_speech",
    "synonyms": "synonym",
    "antonyms": "antonym",
    "hypernyms": "hypernym",
    "definitions": "definition_to_word",
    "arithmetic": "addition",
}


def instruction_key(rec: dict) -> str:
    """The word (or a+b) a record is about; MMLU questions avoid the fine-tuning keys."""
    if rec["task"] == "definition_to_word":
        return rec["output"]
    if rec["task"] == "addition":
        return rec["instruction"].removeprefix("What is ").removesuffix("?").replace(" ", "")
    return rec["input"]


def build_mmlu(
    k: Knowledge,
    seed: int = 0,
    dev_per_subject=MMLU_DEV_PER_SUBJECT,
    test_per_subject=MMLU_TEST_PER_SUBJECT,
    train_records: list[dict] | None = None,
    mc_keys: dict[str, set] | None = None,
):
    """Dev/test multiple choice; no question is about a word of the same task's
    instruction training records (so MMLU accuracy is not fine-tuning memorisation)."""
    dev, test = [], []
    for si, subject in enumerate(MMLU_SUBJECTS):
        rng = random.Random(seed * 1000 + 100 + si)
        avoid: set = {instruction_key(r) for r in train_records or [] if r["task"] == SUBJECT_TASK[subject]}
        avoid |= (mc_keys or {}).get(subject, set())
        dev += _mmlu_items(subject, k, rng, dev_per_subject, avoid)
        test += _mmlu_items(subject, k, rng, test_per_subject, avoid)
    return {"dev": dev, "test": test}


README = """# Embedded datasets

Small, offline datasets for the default fine-tuning job and its evaluation. Generated by
`scripts/build_default_dataset.py` (seeded; re-running gives identical files):

```bash
apt-get update && apt-get install -y wordnet-base
python scripts/build_default_dataset.py --seed {seed}
```

## `instructions/` - Alpaca-style instruction data

`train.json` ({n_train}), `val.json` ({n_val}), `test.json` ({n_test}): JSON lists of
`{{"instruction": str, "input": str, "output": str, "task": str}}` (`input` may be `""`;
`task` is an extra field naming the task, for per-task metrics). Outputs are short
(one word, number or letter) so exact match is a fair metric.

| task | train / val / test | example |
| --- | --- | --- |
{task_rows}

Within a task a word never appears in two splits, so val/test measure whether the model
retrieves facts it saw in pretraining (the WordNet paragraphs of the embedded model's
corpus), not whether it memorised fine-tuning answers. The knowledge tasks use only
synsets that were in the model's pretraining text (sense-tagged synsets whose paragraph
is not in the held-out test text). `addition`, `count_letters` and `reverse_word` are
procedural. `multiple_choice` records are questions in the MMLU subjects' style (input:
question then `A. ...` to `D. ...` lines, output: the letter); they teach the format,
and no MMLU dev/test question is about one of their words.

`part_of_speech` uses only words that have a single part of speech in all of WordNet.
Some questions have several right answers (a word with many synonyms); the record holds
one (the most frequent other word of the word's most frequent synset) - exact match
against it is a lower bound.

## `mmlu/` - MMLU-format multiple choice

`dev.json` ({n_dev}, {dev_per} per subject, for 5-shot prompts) and `test.json`
({n_mmlu_test}): JSON lists of `{{"question": str, "choices": [4 str], "answer": "A".."D",
"subject": str}}`. Subjects: {subjects}. `part_of_speech` questions list the four
classes in a fixed order (noun, verb, adjective, adverb) and draw the class uniformly;
elsewhere distractors are random words (of the same part of speech for `definitions`)
that are not synonyms of the answer, in random order. The correct letter is uniformly
random ({answer_counts} in test). Chance is 25%. No question is about a
word (or a sum) of the same task's instruction training records, so MMLU accuracy
after fine-tuning reflects pretraining knowledge plus the learned format.

## Source and license

Word facts come from WordNet 3.0 (Debian package `wordnet-base`, files
`/usr/share/wordnet/data.*` and `cntlist.rev`). WordNet license:

> WordNet 3.0 Copyright 2006 by Princeton University. All rights reserved.
>
> Permission to use, copy, modify and distribute this software and database and its
> documentation for any purpose and without fee or royalty is hereby granted, provided
> that you agree to comply with the following copyright notice and statements,
> including the disclaimer, and that the same appear on ALL copies of the software,
> database and documentation, including modifications that you make for internal use
> or for distribution.
>
> THIS SOFTWARE AND DATABASE IS PROVIDED "AS IS" AND PRINCETON UNIVERSITY MAKES NO
> REPRESENTATIONS OR WARRANTIES, EXPRESS OR IMPLIED. BY WAY OF EXAMPLE, BUT NOT
> LIMITATION, PRINCETON UNIVERSITY MAKES NO REPRESENTATIONS OR WARRANTIES OF
> MERCHANTABILITY OR FITNESS FOR ANY PARTICULAR PURPOSE OR THAT THE USE OF THE LICENSED
> SOFTWARE, DATABASE OR DOCUMENTATION WILL NOT INFRINGE ANY THIRD PARTY PATENTS,
> COPYRIGHTS, TRADEMARKS OR OTHER RIGHTS.
>
> The name of Princeton University or Princeton may not be used in advertising or
> publicity pertaining to distribution of the software and/or database. Title to
> copyright in this software, database and any associated documentation shall at all
> times remain with Princeton University and LICENSEE agrees to preserve same.

The procedural tasks (arithmetic, letters) are generated and carry no third-party
content.
"""


def write_datasets(out: str | Path, wordnet_dir=bbm.DEFAULT_WORDNET_DIR, seed: int = 0, heldout_permille: int = 20) -> dict:
    """Generate everything into a temp dir, then rename it over ``out``."""
    k = Knowledge(wordnet_dir, heldout_permille)
    inst, mc_keys = build_instructions(k, seed)
    mmlu = build_mmlu(k, seed, train_records=inst["train"], mc_keys=mc_keys)
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    old = None
    try:
        (tmp / "instructions").mkdir()
        (tmp / "mmlu").mkdir()
        for name, recs in inst.items():
            (tmp / "instructions" / f"{name}.json").write_text(json.dumps(recs, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        for name, recs in mmlu.items():
            (tmp / "mmlu" / f"{name}.json").write_text(json.dumps(recs, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        rows = []
        n_subj = len(MMLU_SUBJECTS)
        all_counts = {**TASK_COUNTS, "multiple_choice": tuple(n * n_subj for n in MC_COUNTS)}
        for task, (a, b, c) in all_counts.items():
            ex = next(r for r in inst["train"] if r["task"] == task)
            shown = ex["instruction"] + (f" / {ex['input']}" if ex["input"] else "")
            shown = shown.replace("\n", " ")
            rows.append(f"| `{task}` | {a} / {b} / {c} | {shown} -> {ex['output']} |")
        ans = {L: sum(1 for r in mmlu["test"] if r["answer"] == L) for L in LETTERS}
        (tmp / "README.md").write_text(
            README.format(
                seed=seed,
                n_train=len(inst["train"]),
                n_val=len(inst["val"]),
                n_test=len(inst["test"]),
                task_rows="\n".join(rows),
                n_dev=len(mmlu["dev"]),
                dev_per=MMLU_DEV_PER_SUBJECT,
                n_mmlu_test=len(mmlu["test"]),
                subjects=", ".join(f"`{s}`" for s in MMLU_SUBJECTS),
                answer_counts=", ".join(f"{L}: {n}" for L, n in ans.items()),
            ),
            encoding="utf-8",
        )
        for p in tmp.rglob("*"):
            p.chmod(0o755 if p.is_dir() else 0o644)
        tmp.chmod(0o755)
        if out.exists():
            old = out.parent / f".{out.name}.old-tmp"
            if old.exists():
                shutil.rmtree(old)
            out.rename(old)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists() and not out.exists():
            old.rename(out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return {
        "instructions": {k2: len(v) for k2, v in inst.items()},
        "mmlu": {k2: len(v) for k2, v in mmlu.items()},
        "bytes": sum(p.stat().st_size for p in out.rglob("*") if p.is_file()),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--wordnet-dir", type=Path, default=bbm.DEFAULT_WORDNET_DIR)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--heldout-permille", type=int, default=20, help="must match build_base_model.py")
    args = p.parse_args(argv)
    try:
        stats = write_datasets(args.out, args.wordnet_dir, args.seed, args.heldout_permille)
    except bbm.CorpusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
