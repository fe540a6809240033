"""Run several evaluation tasks on one model: validation first, then scoring, timing and a report."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from qblora_pl.evaluation.base import EvaluationTask
from qblora_pl.evaluation.instruction import GreedyExactMatch, InstructionPerplexity
from qblora_pl.evaluation.mmlu import MMLU
from qblora_pl.evaluation.zero_shot import ZeroShotMultipleChoice
from qblora_pl.evaluation.scoring import LanguageModelScorer

TASKS: dict[str, type[EvaluationTask]] = {
    "mmlu": MMLU,
    "zero_shot": ZeroShotMultipleChoice,
    "instruction_ppl": InstructionPerplexity,
    "exact_match": GreedyExactMatch,
}
"""Short names usable in place of a ``class_path`` entry: each builds the task with its defaults."""


def resolve_tasks(tasks: Sequence[EvaluationTask | str]) -> list[EvaluationTask]:
    """Tasks from objects or registered names; unknown names and duplicate task names are errors."""
    if not tasks:
        raise ValueError(f"no evaluation tasks given; use any of {sorted(TASKS)} or a class_path entry")
    resolved = []
    for i, task in enumerate(tasks):
        if isinstance(task, str):
            if task not in TASKS:
                raise ValueError(f"unknown evaluation task name {task!r} (tasks[{i}]); known names: "
                                 f"{', '.join(sorted(TASKS))}, or give a class_path to an EvaluationTask subclass")
            task = TASKS[task]()
        elif not isinstance(task, EvaluationTask):
            raise TypeError(f"tasks[{i}] is a {type(task).__name__}, expected an EvaluationTask or a task name")
        resolved.append(task)
    names = [t.name for t in resolved]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"evaluation task names must be unique; repeated: {duplicates} (set name: in init_args)")
    return resolved


def check_tasks(tasks: Sequence[EvaluationTask]) -> dict[str, int]:
    """Read and validate every task's records (no model work); ``{task: examples}``."""
    return {task.name: task.load_and_check() for task in tasks}


def run_tasks(model: nn.Module, tokenizer: Any, tasks: Sequence[EvaluationTask], *, batch_size: int = 8,
              max_length: int | None = None, progress: bool = True,
              log: Callable[[str], None] | None = None) -> dict[str, dict[str, Any]]:
    """Validate all tasks, then evaluate each; returns ``{task: {metrics, examples, seconds, examples_per_s, config}}``."""
    check_tasks(tasks)
    scorer = LanguageModelScorer(model, tokenizer, batch_size=batch_size, max_length=max_length, progress=progress)
    results = {}
    for task in tasks:
        started = time.perf_counter()
        metrics = task.evaluate(scorer)
        seconds = time.perf_counter() - started
        n = task.num_examples()
        results[task.name] = {"metrics": metrics, "examples": n, "seconds": seconds,
                              "examples_per_s": n / max(seconds, 1e-9), "config": task.config()}
        if task.per_example is not None:
            results[task.name]["per_example"] = task.per_example
        if log is not None:
            log(f"evaluated {task.name}: {n} examples in {seconds:.1f} s ({n / max(seconds, 1e-9):.1f} examples/s)")
    return results


def format_results_table(results: dict[str, dict[str, Any]], max_rows_per_task: int | None = None) -> str:
    """A plain-text table: task, metric, value, examples, examples/s (headline metrics first)."""
    rows = [("task", "metric", "value", "examples", "examples/s")]
    for name, result in results.items():
        items = list(result["metrics"].items())
        if max_rows_per_task is not None:
            items = items[:max_rows_per_task]
        for j, (metric, value) in enumerate(items):
            first = j == 0
            rows.append((name if first else "", metric, f"{value:.4f}",
                         str(result["examples"]) if first else "", f"{result['examples_per_s']:.1f}" if first else ""))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    line = "-+-".join("-" * w for w in widths)
    out = []
    for k, row in enumerate(rows):
        out.append(" | ".join(cell.ljust(w) if c < 2 else cell.rjust(w) for c, (cell, w) in enumerate(zip(row, widths))))
        if k == 0:
            out.append(line)
    return "\n".join(out)


def write_report(path: str | Path, results: dict[str, dict[str, Any]], **context: Any) -> Path:
    """Write ``{**context, "tasks": results}`` as JSON (parents created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**context, "tasks": results}, indent=2, default=str))
    return path
