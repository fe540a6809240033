"""Shared-prefix KV caching in the scorer: time and parity against scoring every row in full.

    MODEL=$(python scripts/fetch_smollm2.py --quiet)
    OMP_NUM_THREADS=1 python bench/prefix_cache.py --model $MODEL --mmlu-dir ../shared/data/mmlu \
        --mmlu-subjects 5 --mmlu-limit-per-subject 10 --arc ../shared/data/arc/ARC-Easy-Test.jsonl --arc-limit 200

Scores the same MMLU k-shot subset (the first ``--mmlu-subjects`` subjects in file order) and the
same ARC questions twice with one :class:`LanguageModelScorer` setting each
(``prefix_cache=False``, then ``True``), at the grid's batch size, and prints per set: seconds,
seconds per question, prompt tokens per second (the tokens of the full prompts, i.e. the work the
uncached path does), the speedup, the largest absolute difference of any score, and how many
predictions agree. ``--threads`` sets torch's intra-op threads (1, like the grid).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qblora_pl.evaluation import MMLU, LanguageModelScorer, ZeroShotMultipleChoice  # noqa: E402
from qblora_pl.sources import load_causal_lm, load_tokenizer  # noqa: E402


def mmlu_subjects(mmlu_dir: str, n: int) -> list[str]:
    names = sorted(p.name[: -len("_test.csv")] for p in (Path(mmlu_dir) / "test").glob("*_test.csv"))
    if len(names) < n:
        raise SystemExit(f"{mmlu_dir}/test has {len(names)} subject files, fewer than --mmlu-subjects {n}")
    return names[:n]


def timed(score, scorer: LanguageModelScorer) -> tuple[torch.Tensor, float]:
    started = time.perf_counter()
    scores = score(scorer)
    return scores, time.perf_counter() - started


def compare(name: str, score, prompt_tokens: int, questions: int, model, tokenizer, batch_size: int) -> dict:
    plain, plain_s = timed(score, LanguageModelScorer(model, tokenizer, batch_size=batch_size, progress=False,
                                                      prefix_cache=False))
    cached, cached_s = timed(score, LanguageModelScorer(model, tokenizer, batch_size=batch_size, progress=False,
                                                        prefix_cache=True))
    agree = int((plain.argmax(-1) == cached.argmax(-1)).sum())
    row = {"set": name, "questions": questions, "prompt_tokens": prompt_tokens,
           "uncached_s": plain_s, "cached_s": cached_s, "speedup": plain_s / cached_s,
           "max_abs_diff": float((plain - cached)[torch.isfinite(plain)].abs().max()), "agree": agree}
    print(f"{name}: {questions} questions, {prompt_tokens} prompt tokens | uncached {plain_s:.1f} s "
          f"({plain_s / questions:.3f} s/question, {prompt_tokens / plain_s:.0f} tok/s) | cached {cached_s:.1f} s "
          f"({cached_s / questions:.3f} s/question, {prompt_tokens / cached_s:.0f} tok/s) | speedup "
          f"{plain_s / cached_s:.2f}x | max |delta score| {row['max_abs_diff']:.2e} | predictions agree {agree}/{questions}",
          flush=True)
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model source (a GGUF file, HF directory or hub name)")
    parser.add_argument("--mmlu-dir", help="MMLU in the original layout (dev/*_dev.csv, test/*_test.csv)")
    parser.add_argument("--mmlu-subjects", type=int, default=5, help="the first N subjects in file-name order")
    parser.add_argument("--mmlu-limit-per-subject", type=int, default=10)
    parser.add_argument("--k-shot", type=int, default=5)
    parser.add_argument("--arc", help="ARC JSONL (official AI2 layout)")
    parser.add_argument("--arc-limit", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8, help="the grid's --eval-batch-size")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_causal_lm(args.model, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(args.model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    probe = LanguageModelScorer(model, tokenizer, progress=False)
    if args.mmlu_dir:
        task = MMLU(data_path=args.mmlu_dir, k_shot=args.k_shot, subjects=mmlu_subjects(args.mmlu_dir, args.mmlu_subjects),
                    limit_per_subject=args.mmlu_limit_per_subject)
        task.load_and_check()
        contexts, _, _ = task.prompts(probe)
        compare(f"MMLU {args.k_shot}-shot", lambda s: task.letter_logprobs(s)[0], sum(map(len, contexts)),
                len(contexts), model, tokenizer, args.batch_size)
    if args.arc:
        arc = ZeroShotMultipleChoice(data_path=args.arc, record_format="arc", limit=args.arc_limit)
        arc.load_and_check()
        tokens = sum(len(c) + len(x) - 1 for c, x in arc.requests(probe))

        def choice_scores(scorer: LanguageModelScorer) -> torch.Tensor:
            lls = arc.choice_loglikelihoods(scorer)
            width = max(map(len, lls))  # 3 to 5 choices: pad with -inf so argmax ignores the gaps
            return torch.tensor([row + [float("-inf")] * (width - len(row)) for row in lls])

        compare("ARC-Easy 0-shot", choice_scores, tokens, len(arc.records), model, tokenizer, args.batch_size)


if __name__ == "__main__":
    main()
