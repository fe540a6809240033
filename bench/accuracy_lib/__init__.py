"""bench/accuracy.py's code (``python bench/accuracy.py --help``), one module per job:

* ``common``: the methods, run keys and format names, learning rates, the machine a run ran on;
* ``methods``: the method registry - each method's base and adapter built from ``configs/<method>.yaml``;
* ``evaluation``: held-out loss and greedy exact match, ARC / MMLU scores;
* ``progress``: a run's finished parts, so a killed run resumes (``RunProgress``);
* ``plan``: the runs an invocation asks for and which are done;
* ``runs``: train one method with one seed, deploy and score it; the unmodified model's rows;
* ``store``: the results file several workers fill together (``ResultsStore``);
* ``stats``: means and spreads over seeds, paired differences and their standard errors;
* ``claims``: the paper's comparisons and each claim read by rule;
* ``report``: tables (plain, Markdown), compute time, plots;
* ``sweep``: learning-rate sweeps and ``--lr-report``;
* ``cli``: the options, a results file's settings, and ``main``.

Every name is also importable from here (``from bench.accuracy_lib import run_key``), as it was from
``bench/accuracy.py`` before the split. What a run measures and what each option is for:
docs/benchmarks.md, part (a).
"""

from __future__ import annotations

from bench.accuracy_lib.common import (
    ROOT, METHODS, DENSE_MERGE, LABEL, REFERENCE, BENCH_METRICS, MATRIX_ISA, machine, machine_label, run_key,
    config_of, run_of, format_name, format_order, method_name, scored_part, learning_rate, _order
)
from bench.accuracy_lib.methods import (
    CONFIGS, method_config, load_class, instantiate, from_config, build, base_args
)
from bench.accuracy_lib.evaluation import (
    benchmark_tasks, benchmark_scores, Evaluator, score, make_evaluator, eval_batches
)
from bench.accuracy_lib.progress import RunProgress
from bench.accuracy_lib.plan import (
    missing_formats, missing_library_formats, wants_trained_benchmarks, missing_trained_benchmarks, is_done,
    reference_runs, planned_runs
)
from bench.accuracy_lib.runs import (
    make_data, train_one, run_method, fill_trained_benchmarks, refreshed_rows, run_reference
)
from bench.accuracy_lib.store import ResultsStore
from bench.accuracy_lib.stats import (
    mean_std, mean_pm_std, summarize, question_means, paired_difference, NOISE_Z, loss_difference
)
from bench.accuracy_lib.claims import (
    CLAIMS, claims_markdown, READINGS, verdict, widening, arc_delta_cell, claims_reading
)
from bench.accuracy_lib.report import (
    present_metrics, metric_description, print_table, markdown_table, pivot_markdown, compute_time, retrained_note,
    plot
)
from bench.accuracy_lib.sweep import (
    LR_CRITERIA, lr_sweep, best_lr, chosen_lrs, method_lr_option, lr_report
)
from bench.accuracy_lib.cli import (
    NEW_OPTION_DEFAULTS, RUN_SELECTION, run_settings, parse_args, model_identity, main
)

__all__ = [  # grouped by module, as imported above
    "ROOT", "METHODS", "DENSE_MERGE", "LABEL", "REFERENCE", "BENCH_METRICS", "MATRIX_ISA", "machine",
    "machine_label", "run_key", "config_of", "run_of", "format_name", "format_order", "method_name", "scored_part",
    "learning_rate", "_order", "CONFIGS", "method_config", "load_class", "instantiate", "from_config", "build",
    "base_args", "benchmark_tasks", "benchmark_scores", "Evaluator", "score", "make_evaluator", "eval_batches",
    "RunProgress", "missing_formats", "missing_library_formats", "wants_trained_benchmarks",
    "missing_trained_benchmarks", "is_done", "reference_runs", "planned_runs", "make_data", "train_one",
    "run_method", "fill_trained_benchmarks", "refreshed_rows", "run_reference", "ResultsStore", "mean_std",
    "mean_pm_std", "summarize", "question_means", "paired_difference", "NOISE_Z", "loss_difference", "CLAIMS",
    "claims_markdown", "READINGS", "verdict", "widening", "arc_delta_cell", "claims_reading", "present_metrics",
    "metric_description", "print_table", "markdown_table", "pivot_markdown", "compute_time", "retrained_note",
    "plot", "LR_CRITERIA", "lr_sweep", "best_lr", "chosen_lrs", "method_lr_option", "lr_report",
    "NEW_OPTION_DEFAULTS", "RUN_SELECTION", "run_settings", "parse_args", "model_identity", "main",
]
