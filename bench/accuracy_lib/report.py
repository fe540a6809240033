"""The results as tables (plain and Markdown), compute time, notes, and plots."""

from __future__ import annotations

import collections
import math
import statistics
import textwrap
from pathlib import Path

from bench.accuracy_lib.common import (
    BENCH_METRICS, LABEL, REFERENCE, _order, config_of, format_name, format_order, machine_label, method_name,
    run_key, run_of,
)
from bench.accuracy_lib.stats import mean_pm_std, summarize


def present_metrics(results: dict[str, dict], exact_match: bool = True) -> list[str]:
    """``loss``, ``exact_match`` (unless free text), then the benchmark metrics some row holds."""
    scored = {m for row in results.values() for part in ("trained", "low_bit") if row.get(part) for m in row[part]}
    return ["loss"] + (["exact_match"] if exact_match else []) + [m for m in BENCH_METRICS if m in scored]


def metric_description(metric: str, split: str = "test", benchmarks: dict[str, str] | None = None) -> str:
    bench = metric.split("_")[0]
    if metric in BENCH_METRICS:
        return f"{metric} on {(benchmarks or {}).get(bench, bench)}"
    return f"{metric} on the held-out {split} split"


def print_table(results: dict[str, dict], metrics: list[str], split: str = "test",
                benchmarks: dict[str, str] | None = None) -> None:
    params = {config_of(key): row["trainable_params"] for key, row in results.items()}
    for metric in metrics:
        table = summarize(results, metric)
        print(f"\n{metric_description(metric, split, benchmarks)} (mean ± std over seeds; n = seeds)")
        print(f"{'method':<14} {'base / low-bit':<14} {'trainable':>10} {'trained model':>26} {'deployed low-bit model':>26}")
        for config in sorted(table, key=_order):
            method, base = config.split("|")
            parts = table[config]
            fmt = lambda p: f"{mean_pm_std(*parts[p])} (n={parts[p][2]})" if p in parts else "-"
            print(f"{method:<14} {base:<14} {params[config]:>10,} {fmt('trained'):>26} {fmt('low_bit'):>26}")


def markdown_table(results: dict[str, dict], metric: str) -> str:
    """The table as Markdown (for README.md): one row per method and deployed format."""
    params = {config_of(key): row["trainable_params"] for key, row in results.items()}
    table = summarize(results, metric)
    lines = [f"| method | deployed as | trainable params | trained model {metric} | deployed low-bit model {metric} | seeds |",
             "|---|---|---|---|---|---|"]
    for config in sorted(table, key=_order):
        method, base = config.split("|")
        parts = table[config]
        cell = lambda p: mean_pm_std(*parts[p]) if p in parts else "—"  # a reference: one evaluation, its value
        if method == REFERENCE:
            name, seeds = "Unmodified model (no training)", "—"
            deployed = "dense float32" if base == "dense" else format_name(base) + " (RTN)"
        else:
            name = method_name(method)
            deployed = "NF4 + adapter (unmerged)" if base == "nf4" else format_name(base)
            seeds = next(iter(parts.values()))[2]
        lines.append(f"| {name} | {deployed} | {params[config]:,} | {cell('trained')} | {cell('low_bit')} | {seeds} |")
    return "\n".join(lines)


def pivot_markdown(results: dict[str, dict], metric: str) -> str:
    """Deployed low-bit models side by side: one row per format, one column per method."""
    table = summarize(results, metric)
    columns = [m for m in (REFERENCE, "qlora+ptq", "qlora+qat", "qblora+ptq", "qblora+qat", "qalora", "qablora")
               if any(c.startswith(m + "|") for c in table)]
    header = {c: "Unmodified + RTN (no training)" if c == REFERENCE else method_name(c) for c in columns}
    formats = sorted({c.split("|")[1] for c in table if c.split("|")[1] not in ("nf4", "dense")}, key=format_order)
    lines = ["| deployed as | " + " | ".join(header[c] for c in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for fmt in formats:
        cells = []
        for column in columns:
            cell = table.get(f"{column}|{fmt}", {}).get("low_bit")
            cells.append(mean_pm_std(*cell, digits=3) if cell else "—")  # a reference: one evaluation, its value
        lines.append(f"| {format_name(fmt)} | " + " | ".join(cells) + " |")
    unmerged = [f"{LABEL[m]} {mean_pm_std(*table[f'{m}|nf4']['trained'], digits=3)}"
                for m in ("qlora", "qblora") if f"{m}|nf4" in table]
    if unmerged:
        lines.append(f"\nUnmerged NF4 + adapter (not a low-bit deployment): {', '.join(unmerged)}.")
    dense = table.get(f"{REFERENCE}|dense", {}).get("trained")
    if dense:
        lines.append(f"\nUnmodified dense model (float32, no training): {dense[0]:.3f}.")
    return "\n".join(lines)


def compute_time(results: dict[str, dict]) -> str:
    """Total wall-clock time of the runs behind ``results`` (rows of one run counted once)."""
    runs: dict[str, dict] = {}
    for key, row in results.items():
        runs.setdefault(run_of(key, row), row)
    train = sum(row.get("train_seconds", 0.0) for row in runs.values() if not row.get("adapter_reused"))
    timed = [row["eval_seconds"] for row in runs.values() if "eval_seconds" in row]
    evaluation = sum(timed) + sum(row.get("load_seconds", 0.0) for row in runs.values())
    evaluation += sum(row.get("trained_benchmark_seconds", 0.0) for row in results.values())  # scored later
    trained = [row for row in runs.values() if row["method"] != REFERENCE]
    text = f"CPU time (wall-clock of the runs where each ran): {len(runs)} runs, training {train / 3600:.2f} h, "
    text += (f"evaluation {evaluation / 3600:.2f} h, total {(train + evaluation) / 3600:.2f} h" if timed
             else "evaluation not recorded")
    if trained:
        mean_eval = statistics.fmean(r["eval_seconds"] for r in trained if "eval_seconds" in r) if any(
            "eval_seconds" in r for r in trained) else math.nan
        text += (f"; per training run {statistics.fmean(r.get('train_seconds', 0.0) for r in trained):.0f} s training"
                 + (f" + {mean_eval:.0f} s evaluation" if math.isfinite(mean_eval) else ""))
    if timed and len(timed) < len(runs):
        text += f" (evaluation time not recorded for {len(runs) - len(timed)} older runs)"
    cpu = [row["cpu_seconds"] for row in runs.values() if "cpu_seconds" in row]
    later = sum(row.get("trained_benchmark_cpu_seconds", 0.0) for row in results.values())  # trained models scored later
    if cpu:
        text += (f"\nprocess CPU time (all threads; load and evaluation included): {(sum(cpu) + later) / 3600:.2f} h over {len(cpu)} "
                 "runs (of the process that stored each run: a run resumed from an earlier attempt's parts counts only "
                 "its last process)")
    machines = collections.Counter(machine_label(row) for row in runs.values())
    if len(machines) > 1:
        text += ("\nruns per machine (times compare only within one): "
                 + "; ".join(f"{label}: {n}" for label, n in machines.items()))
    return text


def retrained_note(results: dict[str, dict]) -> str:
    """The rows whose model is a retrain of a stored QLoRA / Q-BLoRA run that did not reproduce it
    bit for bit (another machine's kernels): which, and by how much its test loss moved."""
    formats: dict[str, list[str]] = {}
    moved: dict[str, str] = {}
    for key, row in results.items():
        stored = results.get(run_key(row["method"], row["seed"], None, None)) if row.get("retrained") else None
        if stored is None:
            continue
        run = f"{LABEL[row['method']]} seed {row['seed']}"
        formats.setdefault(run, []).append(format_name(key.split("|")[1]))
        new, old = row["trained"]["loss"], stored["trained"]["loss"]
        moved[run] = f"{new:.6f} vs the stored run's {old:.6f}, {new - old:+.1e}"
    if not formats:
        return ""
    return "; ".join(f"{run}'s {' / '.join(formats[run])} rows come from a retrain that is not bit-identical to the "
                     f"stored run (trained test loss {moved[run]})" for run in formats) + (
        ": training is deterministic on one machine, and the retrain ran on another one (`machine` in the rows).")


def plot(results: dict[str, dict], metric: str, path: Path, title: str) -> None:
    """Deployed low-bit model's metric per bit width: QLoRA+PTQ, Q-BLoRA+PTQ, QA-LoRA, QA-BLoRA."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = summarize(results, metric)
    group_sizes = sorted({int(c.split("_g")[1]) for c in table if "_g" in c})
    fig, axes = plt.subplots(1, max(1, len(group_sizes)), figsize=(5.5 * max(1, len(group_sizes)) + 2.5, 4.3), squeeze=False)
    series = [(REFERENCE, "unmodified + RTN"),
              ("qlora+ptq", "QLoRA + RTN"), ("qlora+qat", "QLoRA + QAT + RTN"), ("qblora+ptq", "Q-BLoRA + RTN"),
              ("qblora+qat", "Q-BLoRA + QAT + RTN"), ("qalora", "QA-LoRA"), ("qablora", "QA-BLoRA")]
    series = [(m, label) for m, label in series if any(c.startswith(m + "|") for c in table)]
    for ax, g in zip(axes[0], group_sizes):
        bits = sorted({int(c.split("|")[1][3]) for c in table if c.endswith(f"_g{g}")}, reverse=True)
        width = 0.8 / len(series)
        for i, (method, label) in enumerate(series):
            means, stds = [], []
            for b in bits:
                cell = table.get(f"{method}|int{b}_g{g}", {}).get("low_bit")
                means.append(cell[0] if cell else math.nan)
                stds.append(cell[1] if cell and cell[2] > 1 else math.nan)  # one seed or one evaluation: no bar
            xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(bits))]
            ax.bar(xs, means, width, yerr=stds, capsize=3, label=label)
        for method, style in (("qlora", "--"), ("qblora", ":")):
            cell = table.get(f"{method}|nf4", {}).get("trained")
            if cell:
                ax.axhline(cell[0], linestyle=style, color="gray", label=f"{LABEL[method]} (NF4, unmerged)")
        cell = table.get(f"{REFERENCE}|dense", {}).get("trained")
        if cell:
            ax.axhline(cell[0], linestyle="-.", color="black", label="unmodified model (dense)")
        ax.set_xticks(range(len(bits)), [f"INT{b}" for b in bits])
        ax.set_title(f"group size {g}")
        ax.set_ylabel(f"{'' if metric in BENCH_METRICS else 'test '}{metric} of the low-bit model")
        if metric == "loss":
            finite = [v[p][0] for v in table.values() for p in v if math.isfinite(v[p][0])]
            if finite:
                low, high = min(finite) * 0.95, max(finite) * 1.03
                if high > 4 * low:  # a wrecked model (RTN INT2) would flatten the rest
                    from matplotlib.ticker import NullFormatter

                    ax.set_yscale("log")
                    ticks = [t for t in (1, 1.5, 2, 3, 4, 6, 8, 10, 15, 20, 30, 50, 100) if low <= t <= high]
                    ax.set_yticks(ticks, [f"{t:g}" for t in ticks])
                    ax.yaxis.set_minor_formatter(NullFormatter())
                ax.set_ylim(low, high)
        elif metric in BENCH_METRICS:
            ax.axhline(0.25, linestyle=(0, (1, 3)), color="tab:red", linewidth=1, label="chance (4 choices)")
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))  # outside: bars stay visible
    fig.suptitle(textwrap.fill(title, 70), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
