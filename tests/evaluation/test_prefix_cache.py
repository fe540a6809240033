"""Shared-prefix KV caching in LanguageModelScorer: the same numbers as scoring every row in full.

Every comparison runs the same task twice, ``prefix_cache=True`` and ``False``, and also counts
the tokens the model was fed, so a test cannot pass by silently taking the uncached path.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from qblora_pl.evaluation import MMLU, LanguageModelScorer, ZeroShotMultipleChoice
from qblora_pl.evaluation.mmlu import mmlu_shots
from qblora_pl.evaluation.scoring import common_prefix_length, shared_prefix_groups
from tests.evaluation.test_tasks import mmlu_dir, model_and_tokenizer  # noqa: F401  (fixtures)
from tests.export.conftest import adapted_module, gqa_model_dir  # noqa: F401  (fixture)


class TokenCounter:
    """Counts the input tokens (padding included) of every forward pass through ``model``'s embedding."""

    def __init__(self, model: nn.Module) -> None:
        self.tokens = 0
        self.calls = 0
        self._handle = model.get_input_embeddings().register_forward_hook(self._count)

    def _count(self, module, inputs, output) -> None:
        self.tokens += inputs[0].numel()
        self.calls += 1

    def remove(self) -> None:
        self._handle.remove()


def _both(model, tokenizer, score, **scorer_kwargs):
    """``score(scorer)`` with and without the prefix cache; ``(cached, plain, cached_tokens, plain_tokens)``."""
    out = []
    for prefix_cache in (True, False):
        counter = TokenCounter(model)
        try:
            scorer = LanguageModelScorer(model, tokenizer, progress=False, prefix_cache=prefix_cache, **scorer_kwargs)
            out.append((score(scorer), counter.tokens))
        finally:
            counter.remove()
    (cached, cached_tokens), (plain, plain_tokens) = out
    return cached, plain, cached_tokens, plain_tokens


@pytest.fixture(scope="module")
def arc_file(tmp_path_factory):
    """Official AI2 ARC layout: 3 to 5 choices of different token lengths, letter and digit labels."""
    questions = [
        ("Which word names an animal?", ["cat", "the mat", "Le chat est assis sur le tapis", "sleep"], "A"),
        ("What is the capital of France?", ["Paris", "a balanced diet", "numbers 0 1 2"], "A"),
        ("Which is a number?", ["text", "7", "French", "the request", "enough sleep and exercise"], "B"),
        ("Give three tips for staying healthy.", ["Eat a balanced diet", "sits", "mat", "tips"], "1"),
        ("Translate the sentence into French.", ["Le chat", "The cat sits on the mat."], "1"),
    ]
    lines = []
    for i, (stem, texts, key) in enumerate(questions):
        labels = [str(j + 1) for j in range(len(texts))] if key.isdigit() else [chr(65 + j) for j in range(len(texts))]
        lines.append(json.dumps({"id": f"q{i}", "question": {"stem": stem, "choices": [
            {"text": t, "label": label} for t, label in zip(texts, labels)]}, "answerKey": key}))
    path = tmp_path_factory.mktemp("arc") / "ARC-Easy-Test.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_shared_prefix_groups_split_rows_at_the_common_prefix_outside_the_read_positions():
    rows = [[1, 2, 3, 4], [1, 2, 3, 5, 6], [1, 2, 9], [7, 8], [1, 2, 3, 4, 5]]
    hints = [[1, 2, 3, 9]] * 5
    groups, rest = shared_prefix_groups(rows, [1, 2, 1, 1, 1], hints)
    # rows 0 and 1 share [1, 2, 3]; row 2 shares [1, 2] with its hint (alone -> plain); row 3 nothing;
    # row 4 shares [1, 2, 3] too
    assert groups == [([1, 2, 3], [0, 1, 4])] and rest == [2, 3]
    # the last `keep` positions never go into the prefix: keep=2 on row 0 leaves it only [1, 2]
    groups, rest = shared_prefix_groups(rows, [2, 2, 1, 1, 1], hints)
    assert groups == [([1, 2], [0, 2]), ([1, 2, 3], [1, 4])] and rest == [3]
    assert common_prefix_length([1, 2, 3], [1, 2, 4, 5]) == 2 and common_prefix_length([], [1]) == 0


def test_prefix_passes_batch_similar_lengths_only(model_and_tokenizer):  # noqa: F811
    model, tokenizer = model_and_tokenizer
    scorer = LanguageModelScorer(model, tokenizer, batch_size=3, progress=False)
    groups = [([7] * n, [k]) for k, n in enumerate([30, 10, 11, 10, 12])]
    passes = scorer._prefix_passes(groups)
    # sorted 10, 10, 11 fill a pass (3 x 11 = 33 padded <= 1.1 x 31 real); 12 alone would be fine with
    # 30 by count but 2 x 30 = 60 > 1.1 x 42, so 30 gets its own pass
    assert [[len(p) for p, _ in chunk] for chunk in passes] == [[10, 10, 11], [12], [30]]


def test_zero_shot_arc_cached_equals_uncached_with_ragged_choices(model_and_tokenizer, arc_file):  # noqa: F811
    model, tokenizer = model_and_tokenizer
    task = ZeroShotMultipleChoice(data_path=str(arc_file))
    task.load_and_check()
    assert task.detected_format == "arc"
    # batch_size=3 splits the 4- and 5-choice groups into a full and a ragged batch
    cached, plain, cached_tokens, plain_tokens = _both(model, tokenizer, task.choice_loglikelihoods, batch_size=3)
    for c_row, p_row in zip(cached, plain):
        assert torch.allclose(torch.tensor(c_row), torch.tensor(p_row), atol=1e-4), (c_row, p_row)
        assert max(range(len(c_row)), key=c_row.__getitem__) == max(range(len(p_row)), key=p_row.__getitem__)
    assert cached_tokens < plain_tokens  # the questions ran once each, not once per choice


def test_loglikelihoods_cached_equal_uncached_including_greedy_flags(model_and_tokenizer):  # noqa: F811
    model, tokenizer = model_and_tokenizer
    probe = LanguageModelScorer(model, tokenizer, progress=False)
    pairs = [("The cat sits", " on the mat"), ("The cat sits", " on"), ("The cat sits", " cat cat cat"),
             ("Add 2 and 3.", " 5"), ("Add 2 and 3.", " 6"), ("What", " is")]
    requests = [probe.encode_pair(c, x) for c, x in pairs]
    cached, plain, cached_tokens, plain_tokens = _both(model, tokenizer, lambda s: s.loglikelihoods(requests), batch_size=2)
    for (c_ll, c_greedy), (p_ll, p_greedy) in zip(cached, plain):
        assert c_ll == pytest.approx(p_ll, abs=1e-4) and c_greedy == p_greedy
    assert cached_tokens < plain_tokens


@pytest.mark.parametrize("scoring", ["letter_logits", "letter_loglikelihood"])
def test_mmlu_k_shot_cached_equals_uncached_and_runs_the_shots_once_per_subject(
        model_and_tokenizer, mmlu_dir, monkeypatch, scoring):  # noqa: F811
    model, tokenizer = model_and_tokenizer
    task = MMLU(data_path=str(mmlu_dir), k_shot=2)
    task.load_and_check()
    scorer = LanguageModelScorer(model, tokenizer, progress=False)
    contexts, letters, _ = task.prompts(scorer)
    assert len({len(c) for c in contexts}) > 1  # ragged suffixes: the questions differ in length
    assert all(len(ids) > 1 for row in letters for ids in row)  # the tiny tokenizer splits " A" in two
    if scoring == "letter_logits":  # keep the first token of each answer: one next-token pass per question
        real_encode_pair = LanguageModelScorer.encode_pair
        monkeypatch.setattr(LanguageModelScorer, "encode_pair",
                            lambda self, context, continuation: (lambda c, x: (c, x[:1]))(*real_encode_pair(self, context, continuation)))
    # 8 questions per subject with batch_size=3: batches of 3, 3 and 2 on each subject's cache
    cached, plain, cached_tokens, plain_tokens = _both(model, tokenizer, lambda s: task.letter_logprobs(s)[0], batch_size=3)
    assert task.scoring == scoring
    assert torch.allclose(cached, plain, atol=1e-4), (cached - plain).abs().max()
    assert torch.equal(cached.argmax(-1), plain.argmax(-1))
    shots_tokens = sum(len(scorer.encode(mmlu_shots(s, shots))) for s, shots in task.shots.items())
    # cached: each subject's shots once; plain: once per question (8 per subject, 4 rows each for the
    # log-likelihood protocol)
    assert plain_tokens - cached_tokens > 6 * shots_tokens


def test_a_prefix_that_tokenizes_differently_inside_the_prompt_is_cut_to_the_shared_tokens(model_and_tokenizer):  # noqa: F811
    """The token-identity check: rows are split only where their own ids agree with the hint."""
    model, tokenizer = model_and_tokenizer
    scorer = LanguageModelScorer(model, tokenizer, progress=False)
    shared = "Eat a balanced diet, exercise regularly and get enough sleep. What is the "
    questions = ["capital of France?", "capital?", "cat?"]
    hint = scorer.encode(shared)
    contexts = [scorer.encode(shared + q) for q in questions]
    # constructed so that the check fails: the trailing space is a token of its own at the end of
    # the shared text, but merges with the next word (" capital", " c") inside each prompt
    assert all(c[: len(hint)] != hint for c in contexts)
    n = len(hint) - 1
    assert all(common_prefix_length(hint, c) == n for c in contexts)
    # a hint that shares no token with its row (no BOS) sends that row to the plain path
    hints = [hint, hint, scorer.encode("Below is", bos=False)]
    groups, rest = shared_prefix_groups(contexts, [1, 1, 1], hints)
    assert [len(p) for p, _ in groups] == [n] and groups[0][1] == [0, 1] and rest == [2]
    candidates = [[5, 6, 7]] * 3
    cached, plain, cached_tokens, plain_tokens = _both(
        model, tokenizer, lambda s: s.next_token_logprobs(contexts, candidates, prefixes=hints))
    for c, p in zip(cached, plain):
        assert torch.allclose(c, p, atol=1e-4)
    assert cached_tokens < plain_tokens


def test_rows_cut_by_max_length_take_the_plain_path(model_and_tokenizer):  # noqa: F811
    model, tokenizer = model_and_tokenizer
    probe = LanguageModelScorer(model, tokenizer, progress=False)
    context = "Below is an instruction that describes a task, paired with an input that provides further context."
    requests = [probe.encode_pair(context, c) for c in (" Write", " a response", " that appropriately completes")]
    max_length = len(requests[0][0]) - 2  # every row loses its first tokens, so none starts with the context
    cached, plain, cached_tokens, plain_tokens = _both(
        model, tokenizer, lambda s: s.loglikelihoods(requests), max_length=max_length)
    assert [ll for ll, _ in cached] == pytest.approx([ll for ll, _ in plain], abs=1e-4)
    assert cached_tokens == plain_tokens  # nothing was cached


def test_adapted_native_and_grouped_query_models_cache_like_the_plain_path(
        tiny_model_dir, gqa_model_dir, arc_file, mmlu_dir, tmp_path):  # noqa: F811
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qblora_pl.adapters.base import AdaptedLinear
    from qblora_pl.export import export_module
    from qblora_pl.quantization.native_checkpoint import load_native
    from qblora_pl.quantization.int_layer import GroupwiseIntLinear

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.pad_token = tokenizer.eos_token
    module = adapted_module(tiny_model_dir, "qablora", std=0.3)
    adapted = module.model.eval()  # AdaptedLinear layers, non-zero adapters
    export_module(module, tmp_path, formats=["native"], verify=False, log=lambda _: None)
    native = load_native(tmp_path / "native")  # GroupwiseIntLinear layers
    gqa = AutoModelForCausalLM.from_pretrained(gqa_model_dir).eval()  # 4 query heads, 2 key/value heads
    assert any(isinstance(m, AdaptedLinear) for m in adapted.modules())
    assert any(isinstance(m, GroupwiseIntLinear) for m in native.modules())
    zero_shot = ZeroShotMultipleChoice(data_path=str(arc_file))
    mmlu = MMLU(data_path=str(mmlu_dir), k_shot=2)
    zero_shot.load_and_check()
    mmlu.load_and_check()
    for model in (adapted, native, gqa):
        cached, plain, cached_tokens, plain_tokens = _both(model, tokenizer, zero_shot.choice_loglikelihoods, batch_size=3)
        assert torch.allclose(torch.tensor(sum(cached, [])), torch.tensor(sum(plain, [])), atol=1e-4)
        assert cached_tokens < plain_tokens
        cached, plain, cached_tokens, plain_tokens = _both(model, tokenizer, lambda s: mmlu.letter_logprobs(s)[0], batch_size=3)
        assert torch.allclose(cached, plain, atol=1e-4) and torch.equal(cached.argmax(-1), plain.argmax(-1))
        assert cached_tokens < plain_tokens


class _NoCacheArgument(nn.Module):
    """A causal LM whose forward takes no cache: the scorer must not try to cache."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.inner = model

    def get_input_embeddings(self) -> nn.Module:
        return self.inner.get_input_embeddings()

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)


class _ReturnsNoCache(_NoCacheArgument):
    """Takes a cache argument but never returns one (like a model with ``use_cache`` forced off)."""

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None):
        if past_key_values is not None:
            raise AssertionError("the scorer passed a cache the model never returned")
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        out.cache = None
        return out


@pytest.mark.parametrize("wrapper", [_NoCacheArgument, _ReturnsNoCache])
def test_models_without_a_usable_cache_fall_back_to_the_plain_path(model_and_tokenizer, arc_file, wrapper):  # noqa: F811
    model, tokenizer = model_and_tokenizer
    wrapped = wrapper(model).eval()
    task = ZeroShotMultipleChoice(data_path=str(arc_file))
    task.load_and_check()
    scorer = LanguageModelScorer(wrapped, tokenizer, progress=False)
    assert scorer.prefix_cache == (wrapper is _ReturnsNoCache)  # the signature says whether to try
    lls = task.choice_loglikelihoods(scorer)
    assert not scorer.prefix_cache  # switched off after the first prefix came back without a cache
    reference = task.choice_loglikelihoods(LanguageModelScorer(model, tokenizer, progress=False, prefix_cache=False))
    assert torch.allclose(torch.tensor(sum(lls, [])), torch.tensor(sum(reference, [])), atol=1e-5)
