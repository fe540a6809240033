"""Means and spreads over seeds, and paired differences between two configs with their standard errors."""

from __future__ import annotations

import math
import statistics

from bench.accuracy_lib.common import config_of, scored_part


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def mean_pm_std(mean: float, std: float, n: int, digits: int = 4) -> str:
    """``"1.9271 ± 0.0012"`` over ``n`` seeds; one seed has no spread, so just ``"1.9271"`` (not ``± 0``)."""
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if n > 1 else f"{mean:.{digits}f}"


def summarize(results: dict[str, dict], metric: str) -> dict[str, dict[str, tuple[float, float, int]]]:
    """{config: {"trained" | "low_bit": (mean, std, n)}} over seeds."""
    groups: dict[str, dict[str, list[float]]] = {}
    for key, row in results.items():
        config = config_of(key)
        for part in ("trained", "low_bit"):
            if row.get(part) is not None and metric in row[part]:
                groups.setdefault(config, {}).setdefault(part, []).append(row[part][metric])
    return {c: {p: (*mean_std(v), len(v)) for p, v in parts.items()} for c, parts in groups.items()}


def question_means(results: dict[str, dict], config: str, metric: str) -> tuple[list[float], int] | None:
    """Per question, the fraction of ``config``'s seeds that got it right (the deployed model's
    outcomes; for ``*|nf4`` rows the trained model's), and how many seeds; None without outcomes."""
    part = scored_part(config)
    runs = [row[part]["hits"][metric] for key, row in results.items()
            if config_of(key) == config and row.get(part) and metric in row[part].get("hits", {})]
    if not runs or len({len(r) for r in runs}) != 1:
        return None
    return [statistics.fmean(int(r[q]) for r in runs) for q in range(len(runs[0]))], len(runs)


def paired_difference(results: dict[str, dict], config_a: str, config_b: str, metric: str):
    """Accuracy of ``config_a`` minus ``config_b`` on the same questions, with its standard error
    over questions: ``(mean, se, n_questions, seeds_a, seeds_b)``, or None without outcomes.

    Each question's difference is taken between the two methods' seed-averaged outcomes, so
    the questions that both get right or both get wrong cancel - the paired error is far below
    the two accuracies' own binomial errors (about 0.016 each for ARC's 1000 questions). It
    measures how sure the difference is *on these questions' population* for these seeds; the
    spread over seeds is the tables' ± std.
    """
    a, b = question_means(results, config_a, metric), question_means(results, config_b, metric)
    if a is None or b is None or len(a[0]) != len(b[0]):
        return None
    diffs = [x - y for x, y in zip(a[0], b[0])]
    return statistics.fmean(diffs), statistics.stdev(diffs) / math.sqrt(len(diffs)), len(diffs), a[1], b[1]


NOISE_Z = 2.0  # |difference / its standard error| below this reads as noise


def loss_difference(results: dict[str, dict], config_a: str, config_b: str):
    """Test loss of ``config_a`` minus ``config_b`` over seeds: ``(mean, se, seeds_a, seeds_b)``;
    ``se`` is None when a side has one seed (no spread to judge the difference by)."""
    table = summarize(results, "loss")
    a = table.get(config_a, {}).get(scored_part(config_a))
    b = table.get(config_b, {}).get(scored_part(config_b))
    if a is None or b is None:
        return None
    se = math.sqrt(a[1] ** 2 / a[2] + b[1] ** 2 / b[2]) if a[2] > 1 and b[2] > 1 else None
    return a[0] - b[0], se, a[2], b[2]


def _direction(mean: float, se: float | None, higher_is_better: bool) -> int | None:
    """+1 (A better beyond noise), -1 (A worse), 0 (within noise), None (no spread to judge by)."""
    if se is None:
        return None
    gain = mean if higher_is_better else -mean
    if se == 0:  # every paired difference equal: no noise at all
        return (gain > 0) - (gain < 0)
    return 1 if gain / se >= NOISE_Z else -1 if gain / se <= -NOISE_Z else 0
