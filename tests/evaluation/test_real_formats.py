"""Real benchmark file layouts: ARC's official JSONL, MMLU's CSVs (embedded newlines, \\x85), per-subject limits,
the non-finite-logits guard; and (marked ``realmodel``) the real files in ../shared/data."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from qblora_pl.evaluation import (
    MMLU,
    GreedyExactMatch,
    InstructionPerplexity,
    LanguageModelScorer,
    NonFiniteLogitsError,
    ZeroShotMultipleChoice,
    read_records,
    run_tasks,
)
from qblora_pl.evaluation.base import EvaluationDataError
from qblora_pl.evaluation.mmlu import mmlu_prompt

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def official_arc(qid, stem, texts, labels, key):
    return {"id": qid, "question": {"stem": stem, "choices": [{"text": t, "label": lab} for t, lab in zip(texts, labels)]},
            "answerKey": key}


ARC_ROWS = [
    official_arc("Mercury_1", "Which gas do plants take in?", ["oxygen", "carbon dioxide", "helium", "neon"], list("ABCD"), "B"),
    official_arc("NYSEDREGENTS_2", "What is 2 + 2?", ["3", "4", "5"], ["1", "2", "3"], "2"),  # digit labels, 3 choices
    official_arc("MCAS_3", "Which is a mammal?", ["shark", "trout", "whale", "eel", "crab"], list("ABCDE"), "C"),  # 5 choices
    official_arc("NYSEDREGENTS_4", "Pick the last.", ["w", "x", "y", "z"], ["1", "2", "3", "4"], "4"),
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------
# ARC, official JSONL
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("record_format", ["auto", "arc"])
def test_arc_official_layout(tmp_path, record_format):
    path = write_jsonl(tmp_path / "ARC-Easy-Test.jsonl", ARC_ROWS)
    task = ZeroShotMultipleChoice(data_path=str(path), record_format=record_format)
    assert task.load_and_check() == 4
    assert task.detected_format == "arc"
    assert task.records[0] == {"query": "Question: Which gas do plants take in?\nAnswer:",
                               "choices": ["oxygen", "carbon dioxide", "helium", "neon"], "gold": 1}
    assert [r["gold"] for r in task.records] == [1, 1, 2, 3]
    assert [len(r["choices"]) for r in task.records] == [4, 3, 5, 4]
    # the hub's flattened layout of the same questions gives the same records
    hub = [{"id": r["id"], "question": r["question"]["stem"], "answerKey": r["answerKey"],
            "choices": {"text": [c["text"] for c in r["question"]["choices"]],
                        "label": [c["label"] for c in r["question"]["choices"]]}} for r in ARC_ROWS]
    (tmp_path / "hub.json").write_text(json.dumps(hub))
    flat = ZeroShotMultipleChoice(data_path=str(tmp_path / "hub.json"), record_format=record_format)
    flat.load_and_check()
    assert flat.records == task.records


def test_arc_limit_takes_the_first_records_and_still_validates_all(tmp_path):
    path = write_jsonl(tmp_path / "arc.jsonl", ARC_ROWS)
    task = ZeroShotMultipleChoice(data_path=str(path), limit=2)
    assert task.load_and_check() == 2
    assert [r["choices"][0] for r in task.records] == ["oxygen", "3"]
    write_jsonl(path, ARC_ROWS + [official_arc("bad", "Q?", ["a", "b"], ["A", "B"], "C")])
    with pytest.raises(EvaluationDataError, match=r"row 4 \(0-based\)"):
        ZeroShotMultipleChoice(data_path=str(path), limit=2).load_and_check()


@pytest.mark.parametrize("bad, message", [
    (official_arc("x", "Q?", ["a", "b", "c"], ["1", "2", "3"], "D"), r"answerKey 'D' is not one of the choice labels 1, 2, 3"),
    (official_arc("x", "Q?", ["a", "b", "c", "d"], list("ABCD"), "1"), r"answerKey '1' is not one of the choice labels A, B, C, D"),
    (official_arc("x", "", ["a", "b"], list("AB"), "A"), r"the question text 'question.stem' is missing or empty"),
    (official_arc("x", "Q?", ["a", "b", "c"], list("ABA"), "A"), r"repeated choice labels"),
    (official_arc("x", "Q?", ["a", "", "c"], list("ABC"), "A"), r"option 1 \(B\) is missing or empty"),
    ({"id": "x", "question": {"stem": "Q?", "choices": "abc"}, "answerKey": "A"}, r"'question.choices' must be a list"),
])
def test_arc_bad_rows_name_file_and_row(tmp_path, bad, message):
    path = write_jsonl(tmp_path / "ARC-Easy-Dev.jsonl", ARC_ROWS[:2] + [bad])
    with pytest.raises(EvaluationDataError, match=r"ARC-Easy-Dev\.jsonl: row 2 \(0-based\): " + message):
        ZeroShotMultipleChoice(data_path=str(path)).load_and_check()


def test_auto_format_detects_generic_and_rejects_unknown(tmp_path):
    generic = tmp_path / "g.json"
    generic.write_text(json.dumps([{"query": "Q:", "choices": ["a", "b"], "gold": 1}]))
    task = ZeroShotMultipleChoice(data_path=str(generic))
    task.load_and_check()
    assert task.detected_format == "generic" and task.records[0]["gold"] == 1
    unknown = tmp_path / "u.json"
    unknown.write_text(json.dumps([{"prompt": "Q:", "options": ["a", "b"]}]))
    with pytest.raises(EvaluationDataError, match=r"u\.json: row 0 \(0-based\): cannot tell the record format"):
        ZeroShotMultipleChoice(data_path=str(unknown)).load_and_check()


def test_jsonl_keeps_unicode_line_separators_inside_strings(tmp_path):
    rows = [official_arc("x", "Line one\u2028line two\x85end?", ["a", "b"], list("AB"), "A")]
    task = ZeroShotMultipleChoice(data_path=str(write_jsonl(tmp_path / "arc.jsonl", rows)))
    assert task.load_and_check() == 1
    assert task.records[0]["query"] == "Question: Line one\u2028line two\x85end?\nAnswer:"


# --------------------------------------------------------------------------------------------
# MMLU CSV
# --------------------------------------------------------------------------------------------


def write_mmlu_csv(root: Path, subject: str, test_rows: list[str], dev_rows: list[str]) -> None:
    for split, rows in (("test", test_rows), ("dev", dev_rows)):
        (root / split).mkdir(parents=True, exist_ok=True)
        with open(root / split / f"{subject}_{split}.csv", "w", encoding="utf-8", newline="") as handle:
            handle.write("".join(rows))


def test_mmlu_csv_keeps_embedded_newlines_and_x85(tmp_path):
    test = ['"Which statement is true?\nI. one\nII. two",I only,II only,both,neither,C\n',
            'Functional structures help to create\x85,silos,teams,synergy,chaos,A\n',
            '"Windows line\r\nbreak",a,"b, with comma","c ""quoted""",d,D\r\n']
    write_mmlu_csv(tmp_path, "management", test, ['"Dev\r\nquestion",a,b,c,d,B\n'])
    task = MMLU(data_path=str(tmp_path), k_shot=1)
    assert task.load_and_check() == 3
    q = [r["question"] for r in task.records]
    assert q == ["Which statement is true?\nI. one\nII. two", "Functional structures help to create\x85",
                 "Windows line\r\nbreak"]
    assert task.records[2]["choices"] == ["a", "b, with comma", 'c "quoted"', "d"] and task.records[2]["label"] == 3
    prompt = mmlu_prompt(task.records[0], task.shots["management"])
    assert prompt == ("The following are multiple choice questions (with answers) about management.\n\n"
                      "Dev\r\nquestion\nA. a\nB. b\nC. c\nD. d\nAnswer: B\n\n"
                      "Which statement is true?\nI. one\nII. two\nA. I only\nB. II only\nC. both\nD. neither\nAnswer:")


def test_read_records_csv_errors_name_file_and_row(tmp_path):
    path = tmp_path / "x_test.csv"
    path.write_text('"multi\nline",a,b,c,d,A\nQ2,a,b\n', encoding="utf-8")
    with pytest.raises(EvaluationDataError, match=r"x_test\.csv: row 1 \(0-based\): expected 6 columns .*got 3 \(the row ends on line 3\)"):
        read_records(path, csv_fieldnames=["question", "A", "B", "C", "D", "answer"])
    path.write_bytes(b"Q,\xff,b,c,d,A\n")
    with pytest.raises(EvaluationDataError, match=r"x_test\.csv: not UTF-8"):
        read_records(path, csv_fieldnames=["question", "A", "B", "C", "D", "answer"])


def test_mmlu_limit_per_subject_is_the_first_n_in_file_order(tmp_path):
    for subject in ("anatomy", "virology", "zoology"):
        write_mmlu_csv(tmp_path, subject, [f"{subject} q{i},a,b,c,d,{'ABCD'[i % 4]}\n" for i in range(7)],
                       [f"{subject} dev{i},a,b,c,d,A\n" for i in range(5)])
    task = MMLU(data_path=str(tmp_path), k_shot=2, limit_per_subject=3)
    assert task.load_and_check() == 9
    expected = [f"{s} q{i}" for s in ("anatomy", "virology", "zoology") for i in range(3)]
    assert [r["question"] for r in task.records] == expected
    again = MMLU(data_path=str(tmp_path), k_shot=2, limit_per_subject=3)
    again.load_and_check()
    assert again.records == task.records  # deterministic
    picked = MMLU(data_path=str(tmp_path), k_shot=2, subjects=["zoology", "anatomy"], limit_per_subject=2)
    assert picked.load_and_check() == 4
    assert [r["question"] for r in picked.records] == ["anatomy q0", "anatomy q1", "zoology q0", "zoology q1"]
    assert sorted(picked.shots) == ["anatomy", "zoology"]
    assert picked.config()["limit_per_subject"] == 2
    with pytest.raises(EvaluationDataError, match=r"subject\(s\) \['botany'\] have no records"):
        MMLU(data_path=str(tmp_path), subjects=["botany"]).load_and_check()
    with pytest.raises(ValueError, match="limit_per_subject=0"):
        MMLU(limit_per_subject=0)


# --------------------------------------------------------------------------------------------
# Non-finite logits
# --------------------------------------------------------------------------------------------


@pytest.fixture()
def nan_model_and_tokenizer(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    return model, tokenizer


def test_nan_model_fails_every_task_instead_of_scoring(nan_model_and_tokenizer, tmp_path):
    model, tokenizer = nan_model_and_tokenizer
    write_mmlu_csv(tmp_path / "mmlu", "anatomy", [f"q{i},a,b,c,d,B\n" for i in range(3)], ["d,a,b,c,d,A\n"])
    arc = write_jsonl(tmp_path / "arc.jsonl", ARC_ROWS)
    tasks = [MMLU(data_path=str(tmp_path / "mmlu"), k_shot=1), ZeroShotMultipleChoice(data_path=str(arc)),
             InstructionPerplexity(limit=2), GreedyExactMatch(limit=2, max_new_tokens=2)]
    for task in tasks:
        with pytest.raises(NonFiniteLogitsError, match=r"non-finite logits .*NaN"):
            run_tasks(model, tokenizer, [task], batch_size=2, progress=False)


def test_inf_logits_are_caught_too(nan_model_and_tokenizer):
    model, tokenizer = nan_model_and_tokenizer
    scorer = LanguageModelScorer(model, tokenizer, batch_size=2, progress=False)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.0)
        model.lm_head.bias = None
        model.model.norm.weight.fill_(1.0)
        model.lm_head.weight.fill_(float("inf"))
        model.model.embed_tokens.weight.fill_(1.0)
    with pytest.raises(NonFiniteLogitsError):
        scorer.next_token_logprobs([scorer.encode("Hello")], [[1, 2]])


# --------------------------------------------------------------------------------------------
# The real files (../shared/data): marked realmodel, skipped when absent
# --------------------------------------------------------------------------------------------

needs_shared = pytest.mark.skipif(not (SHARED_DATA / "mmlu" / "test").is_dir() or not (SHARED_DATA / "arc").is_dir(),
                                  reason=f"{SHARED_DATA} (real benchmark files) not present")


@pytest.mark.realmodel
@needs_shared
def test_real_mmlu_all_57_subjects_parse():
    task = MMLU(data_path=str(SHARED_DATA / "mmlu"), k_shot=5)
    assert task.load_and_check() == 14042
    assert len({r["subject"] for r in task.records}) == 57 and len(task.shots) == 57
    management = [r for r in task.records if r["subject"] == "management"]
    assert "\x85" in management[39]["question"]
    assert any("\n" in r["question"] for r in task.records)
    limited = MMLU(data_path=str(SHARED_DATA / "mmlu"), k_shot=5, limit_per_subject=10)
    assert limited.load_and_check() == 570
    assert [r for r in limited.records if r["subject"] == "management"] == management[:10]


@pytest.mark.realmodel
@needs_shared
def test_real_arc_easy_official_jsonl():
    test = ZeroShotMultipleChoice(data_path=str(SHARED_DATA / "arc" / "ARC-Easy-Test.jsonl"))
    assert test.load_and_check() == 2376 and test.detected_format == "arc"
    assert {len(r["choices"]) for r in test.records} == {3, 4, 5}
    assert ZeroShotMultipleChoice(data_path=str(SHARED_DATA / "arc" / "ARC-Easy-Dev.jsonl")).load_and_check() == 570


@pytest.mark.realmodel
@needs_shared
def test_real_prompts_equal_lm_eval_prompts(tmp_path):
    """lm-eval's own arc_easy / mmlu task definitions, on the real files, build exactly our prompt strings."""
    if os.environ.get("QBLORA_REQUIRE_REAL") == "1":
        import lm_eval  # noqa: F401 - CI installs the parity extra: a missing peer fails, never skips
    else:
        pytest.importorskip("lm_eval")
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    import lm_eval_parity

    # MMLU: subjects whose first test questions and dev shots hold newlines (\n and \r\n) and a \x85 question.
    subjects = ["college_mathematics", "high_school_european_history", "management"]
    ours = MMLU(data_path=str(SHARED_DATA / "mmlu"), k_shot=5, subjects=subjects, limit_per_subject=40)
    ours.load_and_check()
    names = lm_eval_parity.write_mmlu_tasks(tmp_path, str(SHARED_DATA / "mmlu"), subjects, 5)
    theirs = lm_eval_parity.lm_eval_requests(tmp_path, list(names.values()), limit=40)
    checked = 0
    for subject in subjects:
        records = [r for r in ours.records if r["subject"] == subject]
        assert len(records) == len(theirs[names[subject]]) == 40
        for record, args in zip(records, theirs[names[subject]]):
            assert args == [(mmlu_prompt(record, ours.shots[subject]), f" {x}") for x in "ABCD"]
            checked += "\n" in record["question"] or "\x85" in record["question"]
    assert checked >= 40
    # ARC-Easy: lm-eval's arc_easy prompt on the hub layout == ours on the official JSONL.
    path = str(SHARED_DATA / "arc" / "ARC-Easy-Test.jsonl")
    arc = ZeroShotMultipleChoice(data_path=path)
    arc.load_and_check()
    task = lm_eval_parity.write_zero_shot_task(tmp_path, path, "arc")
    their_arc = lm_eval_parity.lm_eval_requests(tmp_path, [task])[task]
    assert len(their_arc) == 2376
    for record, args in zip(arc.records, their_arc):
        assert args == [(record["query"], " " + c) for c in record["choices"]]
