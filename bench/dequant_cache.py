"""Scoring an INT-b model with and without the dequantized-weight cache: time and parity.

    MODEL=$(python scripts/fetch_smollm2.py --quiet)
    OMP_NUM_THREADS=1 python bench/dequant_cache.py --model $MODEL --bits 3 --group-size 32 \
        --arc ../shared/data/arc/ARC-Easy-Test.jsonl --arc-limit 100 --mmlu-dir ../shared/data/mmlu --mmlu-limit-per-subject 1

Quantizes ``--model`` to INT-``bits`` group ``--group-size`` (round-to-nearest, the grid's
reference base), then scores ARC (0-shot) and MMLU (5-shot) with the scorer the grid uses, once
as is (every :class:`GroupwiseIntLinear` unpacks its weight on every forward) and once inside
``dequantized_weight_cache`` (each weight unpacked once), alternating over ``--rounds``. Prints
each variant's CPU seconds (this process; 1 thread, so other jobs on the machine move it little),
the ratio, and whether every question's outcome and score are identical - the cache must change
time only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qblora_pl.evaluation import MMLU, ZeroShotMultipleChoice, run_tasks  # noqa: E402
from qblora_pl.quantization import GroupwiseInt  # noqa: E402
from qblora_pl.quantization.int_layer import dequantized_weight_cache  # noqa: E402
from qblora_pl.sources import load_tokenizer, pretrained_name_or_path  # noqa: E402


def score(model, tokenizer, tasks, batch_size: int, cached: bool) -> tuple[dict, float]:
    started = time.process_time()
    if cached:
        with dequantized_weight_cache(model):
            results = run_tasks(model, tokenizer, tasks, batch_size=batch_size, progress=False)
    else:
        results = run_tasks(model, tokenizer, tasks, batch_size=batch_size, progress=False)
    return results, time.process_time() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="local dir, .gguf file or hub name")
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--arc", default=None)
    parser.add_argument("--arc-limit", type=int, default=100)
    parser.add_argument("--mmlu-dir", default=None)
    parser.add_argument("--mmlu-limit-per-subject", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    tasks = []
    if args.arc:
        tasks.append(ZeroShotMultipleChoice(data_path=args.arc, name="arc", limit=args.arc_limit))
    if args.mmlu_dir:
        tasks.append(MMLU(data_path=args.mmlu_dir, name="mmlu", k_shot=5, limit_per_subject=args.mmlu_limit_per_subject))
    if not tasks:
        parser.error("give --arc and/or --mmlu-dir")
    directory = pretrained_name_or_path(args.model)
    model = GroupwiseInt(bits=args.bits, group_size=args.group_size).load(directory).eval()
    tokenizer = load_tokenizer(directory)
    seconds = {"uncached": [], "cached": []}
    outcomes = {}
    for _ in range(args.rounds):
        for variant in ("uncached", "cached"):
            results, took = score(model, tokenizer, tasks, args.batch_size, cached=variant == "cached")
            seconds[variant].append(took)
            outcomes.setdefault(variant, results)
    identical = all(outcomes["cached"][t]["per_example"] == outcomes["uncached"][t]["per_example"]
                    and outcomes["cached"][t]["metrics"] == outcomes["uncached"][t]["metrics"] for t in outcomes["cached"])
    best = {variant: min(values) for variant, values in seconds.items()}
    questions = sum(task.num_examples() for task in tasks)
    print(f"INT{args.bits} g{args.group_size}, {questions} questions ({', '.join(t.name for t in tasks)}), "
          f"batch {args.batch_size}, {args.threads} thread(s), best of {args.rounds} rounds (CPU s): "
          f"uncached {best['uncached']:.1f}, cached {best['cached']:.1f} -> {best['uncached'] / best['cached']:.2f}x; "
          f"every outcome and metric identical: {identical}")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "seconds": seconds, "best": best,
                                              "speedup": best["uncached"] / best["cached"], "identical": identical},
                                             indent=1))
    if not identical:
        raise SystemExit("the cache changed a score")


if __name__ == "__main__":
    main()
