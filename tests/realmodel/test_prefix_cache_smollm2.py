"""SmolLM2 scored with and without the scorer's prefix cache: the same MMLU and ARC predictions.

SmolLM2's tokenizer is the case the cache must survive: the blank line that ends the k shots is
one token at the end of the shots but two before a question, so the cached prefix is the tokens
the prompts really share, not the shots tokenized alone.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.realmodel

SUBJECTS = ["abstract_algebra", "high_school_biology", "world_religions"]


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    from qblora_pl.sources import load_causal_lm, load_tokenizer

    torch.set_num_threads(1)
    tokenizer = load_tokenizer(str(smollm2_gguf))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return load_causal_lm(str(smollm2_gguf), dtype=torch.float32).eval(), tokenizer


def _scorers(model, tokenizer):
    from qblora_pl.evaluation import LanguageModelScorer

    return [LanguageModelScorer(model, tokenizer, batch_size=8, progress=False, prefix_cache=on) for on in (True, False)]


def test_mmlu_5_shot_cached_predictions_equal_uncached(smollm2, shared_data):
    from qblora_pl.evaluation import MMLU
    from qblora_pl.evaluation.mmlu import mmlu_shots

    model, tokenizer = smollm2
    task = MMLU(data_path=str(shared_data / "mmlu"), k_shot=5, subjects=SUBJECTS, limit_per_subject=4)
    task.load_and_check()
    cached_scorer, plain_scorer = _scorers(model, tokenizer)
    contexts, _, _ = task.prompts(cached_scorer)
    record = task.records[0]
    shots_ids = cached_scorer.encode(mmlu_shots(record["subject"], task.shots[record["subject"]]))
    assert contexts[0][: len(shots_ids)] != shots_ids  # the shots alone tokenize differently at their end

    cached, _ = task.letter_logprobs(cached_scorer)
    plain, _ = task.letter_logprobs(plain_scorer)
    assert task.scoring == "letter_logits"
    assert torch.equal(cached.argmax(-1), plain.argmax(-1))
    assert torch.allclose(cached, plain, atol=1e-4), (cached - plain).abs().max()


def test_arc_easy_cached_predictions_equal_uncached(smollm2, shared_data):
    from qblora_pl.evaluation import ZeroShotMultipleChoice

    model, tokenizer = smollm2
    task = ZeroShotMultipleChoice(data_path=str(shared_data / "arc" / "ARC-Easy-Test.jsonl"), record_format="arc",
                                  limit=24)
    task.load_and_check()
    cached_scorer, plain_scorer = _scorers(model, tokenizer)
    cached = task.choice_loglikelihoods(cached_scorer)
    plain = task.choice_loglikelihoods(plain_scorer)
    for c_row, p_row in zip(cached, plain):
        assert max(range(len(c_row)), key=c_row.__getitem__) == max(range(len(p_row)), key=p_row.__getitem__)
        assert torch.allclose(torch.tensor(c_row), torch.tensor(p_row), atol=1e-4), (c_row, p_row)
