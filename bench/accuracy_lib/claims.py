"""The paper's comparisons as paired differences on the benchmarks' questions, and each claim read by rule."""

from __future__ import annotations

import math
import statistics

from bench.accuracy_lib.common import BENCH_METRICS, REFERENCE, config_of, format_name, format_order
from bench.accuracy_lib.stats import _direction, loss_difference, paired_difference, question_means


CLAIMS = (  # (A, B, what A vs B tests): configs without the format; "trained" = NF4 + adapter
    ("qblora|nf4", "qlora|nf4", "Q-BLoRA vs QLoRA, trained model (NF4 + adapter)"),
    ("qblora+ptq", "qlora+ptq", "Q-BLoRA + RTN vs QLoRA + RTN"),
    ("qablora", "qlora+ptq", "QA-BLoRA vs QLoRA + RTN"),
    ("qablora", "qalora", "QA-BLoRA vs QA-LoRA"),
    ("qblora+qat", "qlora+qat", "Q-BLoRA + QAT + RTN vs QLoRA + QAT + RTN"),
    ("qablora", "qlora+qat", "QA-BLoRA vs QLoRA + QAT + RTN"),
    ("qablora", REFERENCE, "QA-BLoRA vs the unmodified model + RTN"),
)


def claims_markdown(results: dict[str, dict]) -> str:
    """The paper's comparisons on the benchmarks as paired differences (A − B) with their errors."""
    formats = sorted({config_of(k).split("|")[1] for k in results} - {"nf4", "dense"}, key=format_order)
    lines = ["| comparison (A − B) | deployed as | metric | Δ accuracy | paired SE | Δ / SE | questions | seeds A / B |",
             "|---|---|---|---|---|---|---|---|"]
    for a, b, label in CLAIMS:
        for fmt in (["nf4"] if a.endswith("|nf4") else formats):
            config_a = a if "|" in a else f"{a}|{fmt}"
            config_b = b if "|" in b else f"{b}|{fmt}"
            for metric in BENCH_METRICS:
                found = paired_difference(results, config_a, config_b, metric)
                if found is None:
                    continue
                mean, se, n, seeds_a, seeds_b = found
                shown = "NF4 + adapter" if fmt == "nf4" else format_name(fmt)
                ratio = f"{mean / se:+.1f}" if se > 0 else "—"
                lines.append(f"| {label} | {shown} | {metric} | {mean:+.4f} | {se:.4f} | {ratio} | {n} | "
                             f"{seeds_a} / {'—' if b == REFERENCE else seeds_b} |")
    if len(lines) == 2:
        return "(no paired comparison yet: the rows compared need per-question outcomes, stored since 2026-12-03)"
    return "\n".join(lines)


READINGS = (  # the paper's claims, read from CLAIMS' comparisons: (A, B, the claim in words)
    ("qblora|nf4", "qlora|nf4", "Q-BLoRA >= QLoRA at equal trainable parameters (trained NF4 + adapter)"),
    ("qablora", "qlora+ptq", "QA-BLoRA's exact low-bit model beats QLoRA + RTN"),
    ("qablora", "qalora", "QA-BLoRA's exact low-bit model beats QA-LoRA"),
    # step 3: QLoRA trained with fake quantization for its RTN width, the stronger "QLoRA + PTQ" baseline
    ("qablora", "qlora+qat", "QA-BLoRA's exact low-bit model beats QLoRA + QAT + RTN"),
)


def verdict(arc: int | None, loss: int | None) -> str:
    """One claim at one format, from ARC-Easy acc's paired test (the benchmark) and the test loss.
    ``arc`` is None where ARC-Easy was not scored (a trained NF4 model under ``--bench-trained none``),
    ``loss`` where one seed a side gives the loss no spread to judge by."""
    if arc is None:
        if loss is None:
            return "not judged yet: ARC-Easy not scored, and one seed a side gives the loss no spread"
        return "ARC-Easy not scored; the test loss " + {1: "favours A", -1: "favours B", 0: "is within noise"}[loss]
    if arc and loss is not None and loss == -arc:
        return "mixed: ARC-Easy and the test loss disagree beyond noise"
    if arc > 0:
        return "**reproduced**"
    if arc < 0:
        return "**not reproduced**: A is worse"
    if loss:
        return "within noise on ARC-Easy; the test loss " + ("favours A" if loss > 0 else "favours B")
    return "within noise"


def widening(results: dict[str, dict], a: str, b: str, metric: str = "arc_acc") -> list[str]:
    """Whether A's lead over B grows as the width falls (same group size), per question:
    ``(Δ at the narrower width) - (Δ at the wider)`` with its paired standard error."""
    formats = sorted({config_of(k).split("|")[1] for k in results} - {"nf4", "dense"}, key=format_order)
    by_group: dict[str, list[str]] = {}  # each group size's widths, widest first: INT4 g32 -> INT3 g32 -> INT2 g32
    for fmt in formats:
        by_group.setdefault(fmt.split("_g")[1], []).append(fmt)
    steps = [(wide, narrow) for group in sorted(by_group, key=int) for wide, narrow in zip(by_group[group], by_group[group][1:])]
    lines = []
    for wide, narrow in steps:
        per_width, seeds = [], []
        for fmt in (wide, narrow):
            qa, qb = question_means(results, f"{a}|{fmt}", metric), question_means(results, f"{b}|{fmt}", metric)
            if qa is None or qb is None or len(qa[0]) != len(qb[0]):
                break
            per_width.append([x - y for x, y in zip(qa[0], qb[0])])
            seeds.append(f"{qa[1]} / {qb[1]}")
        if len(per_width) != 2 or len(per_width[0]) != len(per_width[1]):
            continue
        change = [n - w for w, n in zip(*per_width)]
        mean, se = statistics.fmean(change), statistics.stdev(change) / math.sqrt(len(change))
        direction = _direction(mean, se, True)
        word = {1: "widens", -1: "narrows", 0: "does not change beyond noise"}[direction]
        lines.append(f"{format_name(wide)} → {format_name(narrow)}: {metric} Δ {statistics.fmean(per_width[0]):+.3f} → "
                     f"{statistics.fmean(per_width[1]):+.3f}, change {mean:+.3f} (paired SE {se:.3f}; seeds A / B "
                     f"{seeds[0]} → {seeds[1]}): the gap {word}")
    return lines


def arc_delta_cell(arc: tuple | None) -> str:
    """A paired accuracy difference (``paired_difference``'s tuple) as ``+0.012 (+1.50)``: Δ and Δ / SE."""
    if arc is None:
        return "—"
    return f"{arc[0]:+.3f} ({arc[0] / arc[1]:+.2f})" if arc[1] > 0 else f"{arc[0]:+.3f}"


def claims_reading(results: dict[str, dict]) -> str:
    """The paper's claims read from the stored grid: per claim and deployed format, ARC-Easy acc's
    paired difference (the benchmark) and the test-loss difference over seeds, each judged at
    |Δ / SE| >= 2, and a verdict - reproduced, not reproduced, within noise - plus, for the
    QA-BLoRA claims, whether the gap widens as the width falls. Computed, never typed in."""
    formats = sorted({config_of(k).split("|")[1] for k in results} - {"nf4", "dense"}, key=format_order)
    lines = ["| claim (A vs B) | deployed as | ARC-Easy acc Δ (Δ/SE) | test loss Δ (Δ/SE) | seeds A / B | reading |",
             "|---|---|---|---|---|---|"]
    notes = []
    for a, b, claim in READINGS:
        for fmt in (["nf4"] if a.endswith("|nf4") else formats):
            config_a = a if "|" in a else f"{a}|{fmt}"
            config_b = b if "|" in b else f"{b}|{fmt}"
            arc = paired_difference(results, config_a, config_b, "arc_acc")
            loss = loss_difference(results, config_a, config_b)
            if arc is None and loss is None:
                continue
            arc_cell, arc_dir = arc_delta_cell(arc), None
            if arc is not None:
                arc_dir = _direction(arc[0], arc[1], True)
            loss_cell, loss_dir, seeds = "—", None, "—"
            if loss is not None:
                loss_dir = _direction(loss[0], loss[1], False)
                loss_cell = f"{loss[0]:+.4f} " + (f"({loss[0] / loss[1]:+.2f})" if loss[1] else "(one seed: no spread)")
                seeds = f"{loss[2]} / {loss[3]}"
            shown = "NF4 + adapter" if fmt == "nf4" else format_name(fmt)
            lines.append(f"| {claim} | {shown} | {arc_cell} | {loss_cell} | {seeds} | {verdict(arc_dir, loss_dir)} |")
        if not a.endswith("|nf4"):
            notes += [f"{claim}: {line}." for line in widening(results, a, b)]
    if len(lines) == 2:
        return "(no claim can be read yet)"
    return "\n".join(lines + ([""] + [f"- {n}" for n in notes] if notes else []))
