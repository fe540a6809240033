"""Evaluation after fine-tuning: MMLU k-shot, zero-shot multiple choice, perplexity, exact match.

Used by ``python main.py test`` through :class:`qblora_pl.callbacks.EvaluationSuite`, or
directly::

    from qblora_pl.evaluation import MMLU, run_tasks
    results = run_tasks(model, tokenizer, [MMLU(k_shot=5)], batch_size=8)

See docs/evaluation.md.
"""

from qblora_pl.evaluation.base import EvaluationDataError, EvaluationTask, read_records
from qblora_pl.evaluation.instruction import GreedyExactMatch, InstructionPerplexity, normalize_answer
from qblora_pl.evaluation.mmlu import MMLU
from qblora_pl.evaluation.record_parsers import RECORD_FORMATS
from qblora_pl.evaluation.zero_shot import ZeroShotMultipleChoice
from qblora_pl.evaluation.scoring import LanguageModelScorer, NonFiniteLogitsError
from qblora_pl.evaluation.suite import TASKS, check_tasks, format_results_table, resolve_tasks, run_tasks, write_report

__all__ = [
    "EvaluationDataError",
    "EvaluationTask",
    "GreedyExactMatch",
    "InstructionPerplexity",
    "LanguageModelScorer",
    "MMLU",
    "NonFiniteLogitsError",
    "RECORD_FORMATS",
    "TASKS",
    "ZeroShotMultipleChoice",
    "check_tasks",
    "format_results_table",
    "normalize_answer",
    "read_records",
    "resolve_tasks",
    "run_tasks",
    "write_report",
]
