"""Scoring a model: held-out response loss and greedy exact match in one pass, and the ARC / MMLU benchmarks."""

from __future__ import annotations

import functools
import time

import torch


def benchmark_tasks(args) -> list:
    """The benchmarks asked for (``--arc``, ``--mmlu-dir``), built once per process."""
    return list(_benchmark_tasks(args.arc, args.arc_limit, args.mmlu_dir, args.mmlu_k_shot, args.mmlu_limit_per_subject))


@functools.lru_cache(maxsize=4)
def _benchmark_tasks(arc, arc_limit, mmlu_dir, mmlu_k_shot, mmlu_limit_per_subject) -> tuple:
    from qblora_pl.evaluation import MMLU, ZeroShotMultipleChoice

    tasks = []
    if arc is not None:  # record_format auto: the official ARC JSONL is "arc"; the embedded set is "generic"
        tasks.append(ZeroShotMultipleChoice(data_path=arc, name="arc", limit=arc_limit))
    if mmlu_dir is not None:
        tasks.append(MMLU(data_path=mmlu_dir, name="mmlu", k_shot=mmlu_k_shot, limit_per_subject=mmlu_limit_per_subject))
    return tuple(tasks)


def benchmark_scores(model, tokenizer, tasks, batch_size: int, progress: bool = False) -> dict[str, float]:
    """``{arc_acc, arc_acc_norm, arc_n, mmlu_acc, mmlu_acc_subject_mean, mmlu_n}`` (those asked for),
    and ``hits``: ``{arc_acc: "0110...", ...}``, each question's outcome, for paired comparisons."""
    from qblora_pl.evaluation import run_tasks

    was_training = model.training
    results = run_tasks(model, tokenizer, tasks, batch_size=batch_size, progress=progress)
    model.train(was_training)
    scores: dict[str, float] = {}
    for name, result in results.items():
        for metric in ("acc", "acc_norm", "acc_subject_mean"):
            if metric in result["metrics"]:
                scores[f"{name}_{metric}"] = result["metrics"][metric]
        scores[f"{name}_n"] = result["examples"]
        for metric, outcomes in (result.get("per_example") or {}).items():
            scores.setdefault("hits", {})[f"{name}_{metric}"] = outcomes
    return scores


class Evaluator:
    """Scores models on the held-out batches and the requested benchmarks; adds up its own time."""

    def __init__(self, batches: list[dict[str, torch.Tensor]], tokenizer=None, tasks=(), batch_size: int = 16,
                 progress: bool = False) -> None:
        self.batches, self.tokenizer, self.tasks = batches, tokenizer, list(tasks)
        self.batch_size, self.progress = batch_size, progress
        self.seconds = 0.0

    def __call__(self, model, benchmarks: bool = True) -> dict[str, float]:
        from qblora_pl.quantization.int_layer import dequantized_weight_cache

        started = time.perf_counter()
        with dequantized_weight_cache(model):  # INT-b layers unpack once per model, not per forward (exact)
            result = score(model, self.batches)
            if benchmarks and self.tasks:
                result.update(benchmark_scores(model, self.tokenizer, self.tasks, self.batch_size, self.progress))
        self.seconds += time.perf_counter() - started
        return result


@torch.no_grad()
def score(model, batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Token-weighted response loss and teacher-forced greedy exact match over ``batches``."""
    was_training = model.training
    model.eval()
    total_loss, tokens, exact, records = 0.0, 0, 0, 0
    for batch in batches:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        mask = labels != -100
        total_loss += float(torch.nn.functional.cross_entropy(logits[mask], labels[mask], reduction="sum"))
        tokens += int(mask.sum())
        correct = (logits.argmax(-1) == labels) | ~mask
        exact += int(correct.all(dim=1).sum())
        records += labels.size(0)
    model.train(was_training)
    return {"loss": total_loss / max(tokens, 1), "exact_match": exact / max(records, 1), "records": records}


def make_evaluator(args, data, device) -> Evaluator:
    """The held-out batches (``--eval-split``, ``--test-batches``) and benchmarks every model of a run is scored on."""
    batches = eval_batches(data, device, args.test_batches, args.eval_split)
    return Evaluator(batches, data.tokenizer, benchmark_tasks(args), args.eval_batch_size, args.progress)


def eval_batches(data, device, limit: int | None, split: str = "test") -> list[dict[str, torch.Tensor]]:
    data.setup(split if split == "test" else "validate")
    batches = []
    for i, batch in enumerate(data.test_dataloader() if split == "test" else data.val_dataloader()):
        if limit is not None and i >= limit:
            break
        batches.append({k: v.to(device) for k, v in batch.items()})
    return batches
