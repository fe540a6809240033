"""Scoring and task metrics on the tiny fixture model, checked against plain unbatched forwards."""

from __future__ import annotations

import json
import math

import pytest
import torch

from qblora_pl.evaluation import (
    MMLU,
    GreedyExactMatch,
    InstructionPerplexity,
    LanguageModelScorer,
    ZeroShotMultipleChoice,
    normalize_answer,
    run_tasks,
)
from qblora_pl.evaluation.mmlu import LETTERS, mmlu_prompt


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.pad_token = tokenizer.eos_token
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), tokenizer


@pytest.fixture(scope="module")
def mmlu_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("mmlu")
    words = ["cat", "mat", "sits", "tips", "diet", "sleep", "text", "French"]
    test = [{"question": f"Which word is {w}?", "choices": [words[(i + j) % 8] for j in range(4)],
             "answer": LETTERS[i % 4], "subject": ["nouns", "verbs"][i % 2]} for i, w in enumerate(words * 2)]
    dev = [{**r, "question": "Dev " + r["question"]} for r in test[:6]]
    (directory / "test.json").write_text(json.dumps(test))
    (directory / "dev.json").write_text(json.dumps(dev))
    return directory


def _full_logprobs(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)


def test_loglikelihoods_match_unbatched_forward(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    scorer = LanguageModelScorer(model, tokenizer, batch_size=3, progress=False)
    pairs = [("Add 2 and 3.", " 5"), ("Repeat the word.", " cat cat"), ("The cat sits", " on the mat"), ("What", " is")]
    requests = [scorer.encode_pair(c, x) for c, x in pairs]
    batched = scorer.loglikelihoods(requests)
    for (context, continuation), (ll, greedy) in zip(requests, batched):
        logprobs = _full_logprobs(model, context + continuation)
        positions = range(len(context) - 1, len(context) + len(continuation) - 1)
        expected = sum(float(logprobs[p, t]) for p, t in zip(positions, continuation))
        assert ll == pytest.approx(expected, abs=1e-4)
        assert greedy == all(int(logprobs[p].argmax()) == t for p, t in zip(positions, continuation))
    assert scorer.encode_pair("Answer: ", "A") == scorer.encode_pair("Answer:", " A")  # trailing space moves over


def test_mmlu_predictions_are_the_argmax_of_unbatched_letter_scores(model_and_tokenizer, mmlu_dir):
    model, tokenizer = model_and_tokenizer
    task = MMLU(data_path=str(mmlu_dir), k_shot=2)
    task.load_and_check()
    scorer = LanguageModelScorer(model, tokenizer, batch_size=5, progress=False)
    metrics = task.evaluate(scorer)
    hits, per_subject = [], {"nouns": [], "verbs": []}
    for record in task.records:
        text = mmlu_prompt(record, task.shots[record["subject"]])
        scores = []
        for letter in LETTERS:  # independent reference: summed log-prob of " A" .. " D", one row at a time
            context, answer = scorer.encode_pair(text, f" {letter}")
            logprobs = _full_logprobs(model, context + answer)
            scores.append(sum(float(logprobs[len(context) - 1 + j, t]) for j, t in enumerate(answer)))
        hit = float(max(range(4), key=scores.__getitem__) == record["label"])
        hits.append(hit)
        per_subject[record["subject"]].append(hit)
    assert metrics["acc"] == pytest.approx(sum(hits) / len(hits))
    assert task.per_example == {"acc": "".join(str(int(h)) for h in hits)}  # each question, in record order
    assert metrics["acc/nouns"] == pytest.approx(sum(per_subject["nouns"]) / 8)
    assert metrics["acc_subject_mean"] == pytest.approx((metrics["acc/nouns"] + metrics["acc/verbs"]) / 2)
    assert task.shots["nouns"][0]["question"].startswith("Dev ")


def test_zero_shot_acc_and_acc_norm_conventions(tmp_path, monkeypatch):
    """acc: argmax of summed log-likelihoods; acc_norm: argmax after dividing by len(choice) in characters."""
    path = tmp_path / "zs.json"
    records = [
        {"query": "q1", "choices": ["a", "bbbbbbbbbb"], "gold": 1, "task": "x"},  # acc misses, acc_norm hits
        {"query": "q2", "choices": ["ccc", "d"], "gold": 0, "task": "y"},  # both hit
        {"query": "q3", "choices": ["e", "f", "g"], "gold": "C", "task": "y"},  # both miss
    ]
    path.write_text(json.dumps(records))
    lls = [[-2.0, -5.0], [-1.0, -3.0], [-1.0, -1.5, -2.0]]
    task = ZeroShotMultipleChoice(data_path=str(path))
    monkeypatch.setattr(task, "choice_loglikelihoods", lambda scorer: lls)
    metrics = task.evaluate(scorer=None)
    assert metrics == {"acc": pytest.approx(1 / 3), "acc_norm": pytest.approx(2 / 3), "acc/x": 0.0, "acc/y": 0.5,
                       "acc_norm/x": 1.0, "acc_norm/y": 0.5}
    assert task.per_example == {"acc": "010", "acc_norm": "110"}


def test_instruction_response_loss_equals_the_training_loss(model_and_tokenizer, tiny_data_dir):
    from qblora_pl.data.tokenization import InstructionCollator, tokenize_records

    model, tokenizer = model_and_tokenizer
    task = InstructionPerplexity(data_path=str(tiny_data_dir), split="train", limit=12)
    metrics = task.evaluate(LanguageModelScorer(model, tokenizer, batch_size=5, progress=False))
    data = tokenize_records(task.records, tokenizer, "alpaca", 384, 128)
    batch = InstructionCollator(tokenizer.pad_token_id)([data[i] for i in range(len(data))])
    with torch.no_grad():
        loss = model(**batch).loss  # Hugging Face's mean over the batch's response tokens
    assert metrics["response_loss"] == pytest.approx(float(loss), rel=1e-4)
    assert metrics["response_ppl"] == pytest.approx(math.exp(float(loss)), rel=1e-4)
    assert metrics["ppl"] > 1


def test_greedy_generation_is_padding_invariant_and_exact_match_counts(model_and_tokenizer, tiny_data_dir, monkeypatch):
    model, tokenizer = model_and_tokenizer
    prompts = [[1, 40, 41, 42, 43, 44, 45], [1, 50, 51], [1, 60, 61, 62, 63]]
    batched = LanguageModelScorer(model, tokenizer, batch_size=3, progress=False).greedy_generate(prompts, 6)
    single = LanguageModelScorer(model, tokenizer, batch_size=1, progress=False).greedy_generate(prompts, 6)
    assert batched == single and all(len(ids) <= 6 for ids in batched)

    task = GreedyExactMatch(data_path=str(tiny_data_dir), split="test", max_new_tokens=4)
    task.load_and_check()
    answers = {r["instruction"] + r["input"]: r["output"] for r in task.records}
    scorer = LanguageModelScorer(model, tokenizer, progress=False)
    # Make the model "answer" the reference for every second record: exact match must be 1/2.
    fake = [tokenizer(f" {answers[r['instruction'] + r['input']]}." if i % 2 == 0 else " wrong",
                      add_special_tokens=False)["input_ids"] for i, r in enumerate(task.records)]
    monkeypatch.setattr(scorer, "greedy_generate", lambda prompts, n, desc="": fake)
    assert task.evaluate(scorer)["exact_match"] == pytest.approx(sum(i % 2 == 0 for i in range(len(fake))) / len(fake))


def test_normalize_answer():
    assert normalize_answer("  Adverb.\nmore text") == "adverb"
    assert normalize_answer("cleaning   implement") == "cleaning implement"
    assert normalize_answer("") == ""


def test_run_tasks_reports_throughput(model_and_tokenizer, mmlu_dir):
    model, tokenizer = model_and_tokenizer
    results = run_tasks(model, tokenizer, [MMLU(data_path=str(mmlu_dir), k_shot=1, limit=4)], batch_size=4, progress=False)
    assert results["mmlu"]["examples"] == 4 and results["mmlu"]["examples_per_s"] > 0
    assert results["mmlu"]["config"]["scoring"] in {"letter_logits", "letter_loglikelihood"}
    outcomes = results["mmlu"]["per_example"]["acc"]
    assert len(outcomes) == 4 and outcomes.count("1") / 4 == pytest.approx(results["mmlu"]["metrics"]["acc"])
