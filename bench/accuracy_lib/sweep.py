"""Learning-rate sweeps on the validation split: the scores per LR, and each method's chosen LR (``--lr-report``)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from bench.accuracy_lib.common import DENSE_MERGE, METHODS, REFERENCE, _order, learning_rate
from bench.accuracy_lib.stats import summarize


LR_CRITERIA = ("trained", "deployed")


def lr_sweep(paths: list[str], metric: str = "loss"):
    """The scores of LR sweep files: ``(cells, means)``.

    ``cells``: config -> LR -> the score ``lr_report`` tabulates (deployed low-bit model; NF4 rows:
    unmerged). ``means``: criterion (:data:`LR_CRITERIA`) -> method -> LR -> mean score over
    seeds (and, ``deployed``, over the method's deployed formats). Every file must be an
    ``--eval-split val`` result (LRs are chosen on val, never on test).
    """
    values: dict[str, dict[str, dict[float, list[float]]]] = {name: {} for name in LR_CRITERIA}
    cells: dict[str, dict[float, float]] = {}
    for path in paths:
        stored = json.loads(Path(path).read_text())
        settings = stored.get("settings", {})
        if settings.get("eval_split") != "val":
            raise SystemExit(f"{path} was not scored on the validation split (--eval-split val); "
                             "learning rates are chosen on val only")
        for config, parts in summarize(stored["runs"], metric).items():
            method = config.split("|")[0]
            family = method.split("+")[0]
            if family == REFERENCE:
                continue
            lr = learning_rate(settings, family)
            part = "low_bit" if "low_bit" in parts else "trained"
            cells.setdefault(config, {})[lr] = parts[part][0]
            trained_as = method.replace("+ptq", "")  # qlora+qat stays its own method
            criteria = []
            if part == "low_bit":
                criteria.append("deployed")
            if family not in DENSE_MERGE and part == "low_bit":
                criteria.append("trained")  # QA-*: the trained model is the deployed one
            if family in DENSE_MERGE and method == family:
                criteria.append("trained")  # QLoRA / Q-BLoRA: the NF4 row's unmerged model
            for name in criteria:
                values[name].setdefault(trained_as, {}).setdefault(lr, []).append(parts[part][0])
    means = {name: {m: {lr: statistics.fmean(v) for lr, v in by_lr.items()} for m, by_lr in by_method.items()}
             for name, by_method in values.items()}
    return cells, means


def best_lr(means: dict[float, float], metric: str = "loss") -> tuple[float, bool]:
    """The best LR of one method's ``{lr: mean score}`` and whether it lies at an end of the grid."""
    best = (min if metric == "loss" else max)(means, key=means.get)
    return best, len(means) > 1 and best in (min(means), max(means))


def chosen_lrs(method_means: dict[str, dict[float, float]], metric: str = "loss") -> dict[str, float]:
    """method family -> its best LR (a family's own rows before its ``+qat`` variant)."""
    chosen: dict[str, float] = {}
    for method in sorted(method_means, key=lambda m: (METHODS.index(m.split("+")[0]), m)):
        chosen.setdefault(method.split("+")[0], best_lr(method_means[method], metric)[0])
    return chosen


def method_lr_option(chosen: dict[str, float]) -> str:
    return "--method-lr " + " ".join(f"{m}={lr:g}" for m, lr in chosen.items())


def lr_report(paths: list[str], metric: str = "loss", criterion: str = "trained") -> str:
    """Each method's validation ``metric`` per learning rate over sweep files, and the best LR per method.

    ``criterion`` says which model's score chooses:

    * ``trained`` (default): the model each method trains - QLoRA / Q-BLoRA's NF4 base + adapter,
      QA-*'s INT-b model (which is also what they deploy). The quantity the Q-BLoRA vs QLoRA
      comparison is about, and how a QLoRA user tunes before quantizing.
    * ``deployed``: the low-bit model each method ships, mean over its deployed formats (QLoRA /
      Q-BLoRA: merged and RTN re-quantized). For QA-* the two criteria are the same.

    Both are printed; seeds are averaged (:func:`lr_sweep`). Lower is better for ``loss``,
    higher for accuracies.
    """
    if criterion not in LR_CRITERIA:
        raise SystemExit(f"--lr-criterion {criterion!r}: choose 'trained' or 'deployed'")
    cells, means = lr_sweep(paths, metric)
    lrs = sorted({lr for row in cells.values() for lr in row})
    lines = [f"validation {metric} per learning rate (deployed low-bit model; NF4 rows: unmerged)",
             f"{'method':<14} {'base':<10} " + " ".join(f"{lr:>10.0e}" for lr in lrs)]
    for config in sorted(cells, key=_order):
        method, base = config.split("|")
        lines.append(f"{method:<14} {base:<10} " + " ".join(
            f"{cells[config][lr]:>10.4f}" if lr in cells[config] else f"{'-':>10}" for lr in lrs))
    for name in LR_CRITERIA:
        if not means[name] and name != criterion:
            continue  # e.g. a deployed-only sweep (--bench-trained none) has no trained-model scores
        marker = " - chooses" if name == criterion else ""
        lines.append(f"\n{name} model's {'lowest' if metric == 'loss' else 'highest'} val {metric}{marker}:")
        for method in sorted(means[name], key=lambda m: (METHODS.index(m.split("+")[0]), m)):
            best, at_end = best_lr(means[name][method], metric)
            edge = " (at an end of the grid: add the next factor-3 step)" if at_end else ""
            lines.append(f"  {method:<12} {best:g}   (" + ", ".join(
                f"{lr:g}: {v:.4f}" for lr, v in sorted(means[name][method].items())) + ")" + edge)
    lines.append("\nfor the test runs: " + method_lr_option(chosen_lrs(means[criterion], metric)))
    return "\n".join(lines)
