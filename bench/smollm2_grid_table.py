"""Write the SmolLM2 test-split grid (bench/results/accuracy_smollm2.json) into docs/results/README.md.

    python bench/smollm2_grid_table.py            # prints the tables, rewrites the results file's grid block and its plots

One table of every stored configuration (trainable parameters, test loss, ARC-Easy acc / acc_norm, MMLU acc; mean ±
std over the seeds stored so far, with their count), how much of steps 1-3 is stored and the CPU time
it took, plots of the
deployed models' ARC-Easy accuracy and test loss (``bench/results/accuracy_smollm2_<metric>.png``,
the same figures ``--report-only`` writes), the paper's comparisons as paired differences on the
benchmark questions (``bench/accuracy.py``'s ``claims_markdown``) and each claim's verdict by rule
(``claims_reading``). Steps 4 and 5 (budget rank 32 / 9, each in its own file
``accuracy_smollm2_r<rank>.json``) follow: their table, QA-BLoRA vs QA-LoRA beside rank 8 on the
same seeds, and their claims. Then INT2 g32 at its own LR (``accuracy_smollm2_int2_lr.json``): the
validation sweep that chose it, the QA-* test rows, QA-BLoRA vs QA-LoRA at INT3's and INT2's LR, and
the INT2 claims against step 1's baselines; last, QLoRA + QAT's own INT2 LR sweep. Works on a
partly filled grid: what is missing says so. Idempotent: the block between ``<!-- grid:start -->``
and ``<!-- grid:end -->`` is replaced.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.accuracy_lib import (  # noqa: E402
    NOISE_Z, REFERENCE, _order, arc_delta_cell, claims_markdown, claims_reading, compute_time, config_of, format_name,
    format_order, is_done, loss_difference, lr_report, mean_pm_std, method_name, paired_difference, parse_args,
    planned_runs, plot, reference_runs, retrained_note, run_key, scored_part, summarize,
)

RESULTS = ROOT / "bench" / "results" / "accuracy_smollm2.json"
RESULTS_DOC = ROOT / "docs" / "results" / "README.md"  # the block between its grid markers is rewritten
STEP1 = ["--seeds", "0", "1", "2", "--bits", "3", "2", "--group-sizes", "32", "--reference"]
LATER_STEPS = (  # bench/smollm2_grid.sh step2 / step3 at all three seeds
    (2, "INT4 g32 / g64", ["--seeds", "0", "1", "2", "--bits", "4", "--group-sizes", "32", "64", "--reference"]),
    (3, "QAT QLoRA / Q-BLoRA, INT3 / INT2 g32", ["--seeds", "0", "1", "2", "--methods", "qlora", "qblora", "--qat-only",
                                                 "--qat-bits", "3", "2", "--group-sizes", "32"]),
)
RANK_STEPS = (  # (step, budget rank, alpha or None = 16, why): bench/smollm2_grid.sh step4 / step5 [ALPHA=...]
    (4, 32, None,
     "At rank 32 QA-BLoRA fits `k_out = 1` on every layer, where rank 8 forced `k_out = 2` on q, o, gate,\n"
     "up and down; but QA-LoRA's rank 32 then exceeds d_in / g (18 on every 576-input layer), so its update\n"
     "spans the whole group space there too, and only the parameterization differs (not down_proj: 48).\n"
     "And at alpha 16 the scaling s = alpha / r falls to 0.5 (rank 8: 2), so with Adam QA-BLoRA's step in\n"
     "dW is 4x smaller at the rank-8 LR: these rows measure that under-training, not the tying\n"
     "(`docs/benchmarks.md` (a) step 5; the fair re-run below keeps s = 2 with alpha 64)."),
    (4, 32, 64,
     "Rank 32 with rank 8's scaling, s = 64 / 32 = 2: only the tying (QA-BLoRA `k_out = 1` everywhere)\n"
     "and the parameterization differ from QA-LoRA."),
    (5, 9, None,
     "At rank 9 and g32 SmolLM2 has the paper's LLaMA-7B geometry (rank 64, g32): QA-BLoRA takes\n"
     "`k_out = 1` on the attention layers (exactly LoRA-9's count on q and o) and `k_out = 2` on the MLP,\n"
     "as LLaMA-7B's 4096 x 11008 layers do at rank 64, and QA-LoRA's rank is half the group space\n"
     "(9 of 18; LLaMA-7B: 64 of 128). At alpha 16, s = 16 / 9 is 11% below rank 8's 2 (alpha 18 below keeps it)."),
    (5, 9, 18, "Rank 9 with rank 8's scaling, s = 18 / 9 = 2."),
)
COLUMNS = (("loss", "test loss"), ("arc_acc", "ARC-Easy acc"), ("arc_acc_norm", "ARC-Easy acc_norm"),
           ("mmlu_acc", "MMLU 5-shot acc"))
PLOTS = (("arc_acc", "ARC-Easy acc"), ("loss", "test loss"))  # what carries the comparison (chance_note)


def plot_path(metric: str, results_path: Path = RESULTS) -> Path:
    return results_path.with_name(f"{results_path.stem}_{metric}.png")


def plot_link(metric: str) -> str:
    """The plot's path as a link from the results file (``../../bench/results/...png``)."""
    return Path(os.path.relpath(plot_path(metric), RESULTS_DOC.parent)).as_posix()


def write_plots(results: dict[str, dict], results_path: Path = RESULTS) -> list[Path]:
    """The deployed models' ARC-Easy accuracy and test loss per bit width (``bench/accuracy.py``'s ``plot``)."""
    paths = []
    for metric, label in PLOTS:
        path = plot_path(metric, results_path)
        plot(results, metric, path, f"SmolLM2-135M-Instruct, test split: {label} of each deployed model "
                                    "(mean ± std over seeds; no error bar where one seed is stored)")
        paths.append(path)
    return paths


def describe(config: str) -> tuple[str, str]:
    """(method, deployed as) in words for a ``method|base`` configuration."""
    method, base = config.split("|")
    if method == REFERENCE:
        return "Unmodified model (no training)", "dense (Q4_1 weights)" if base == "dense" else f"{format_name(base)} (RTN)"
    return method_name(method), "NF4 + adapter (trained, unmerged)" if base == "nf4" else format_name(base)


def results_table(results: dict[str, dict]) -> str:
    tables = {metric: summarize(results, metric) for metric, _ in COLUMNS}
    configs = sorted({config_of(key) for key in results}, key=_order)
    params = {config_of(key): row["trainable_params"] for key, row in results.items()}
    lines = ["| method | deployed as | trainable params | " + " | ".join(label for _, label in COLUMNS) + " | seeds |",
             "|---" * (len(COLUMNS) + 4) + "|"]
    for config in configs:
        cells, seeds, part = [], "—", scored_part(config)
        for metric, _ in COLUMNS:
            parts = tables[metric].get(config, {})
            if part not in parts:
                cells.append("—")
                continue
            mean, std, n = parts[part]
            cells.append(mean_pm_std(mean, std, n, digits=4 if metric == "loss" else 3))  # a reference: n = 1
            if not config.startswith(REFERENCE + "|"):  # one evaluation, not seeds
                seeds = str(n)
        trainable = f"{params[config]:,}" if params[config] else "—"
        lines.append("| " + " | ".join(describe(config)) + f" | {trainable} | " + " | ".join(cells) + f" | {seeds} |")
    return "\n".join(lines)


def progress(results: dict[str, dict]) -> str:
    args = parse_args(STEP1)
    runs = reference_runs(args) + planned_runs(args)
    missing = [run_key(*run) for run in runs if not is_done(args, run, results)]
    return f"{len(runs) - len(missing)} of {len(runs)} step-1 runs stored" + (
        f"; to go: {', '.join(missing)}" if missing else " (step 1 complete)")


def per_seed(args, runs: list[tuple], done: list[tuple]) -> str:
    """``1 of 3 seeds so far (seed 0: 6 of 6 runs, seed 1: 4 of 6 runs, seed 2: 0 of 6 runs)``: how many of
    each seed's planned ``runs`` are ``done``; ``all 3 seeds (6 runs each)`` once every one is."""
    counts = [(seed, sum(r in done for r in runs if r[1] == seed), sum(r[1] == seed for r in runs)) for seed in args.seeds]
    complete = sum(stored == planned for _, stored, planned in counts)
    if complete == len(counts) and len({planned for _, _, planned in counts}) == 1:
        return f"all {len(counts)} seeds ({counts[0][2]} runs each)"
    return (f"{complete} of {len(counts)} seeds so far ("
            + ", ".join(f"seed {seed}: {stored} of {planned} runs" for seed, stored, planned in counts) + ")")


def later_steps(results: dict[str, dict]) -> str:
    """What steps 2 and 3 (same results file as step 1) have stored, per seed: they may be filled one seed at a time."""
    lines = []
    for step, what, argv in LATER_STEPS:
        args = parse_args(argv)
        refs, runs = reference_runs(args), planned_runs(args)
        done = [run for run in refs + runs if is_done(args, run, results)]
        if not done:
            lines.append(f"step {step} ({what}): not started")
            continue
        counts = [f"references {sum(r in done for r in refs)} of {len(refs)}"] if refs else []
        lines.append(f"step {step} ({what}): " + ", ".join(counts + [per_seed(args, runs, done)]))
    return "; ".join(lines)


def chance_note(results: dict[str, dict]) -> str:
    """How far the unmodified model's MMLU and ARC accuracies sit from chance (4 choices), in binomial errors."""
    dense = (results.get(f"{REFERENCE}|dense") or {}).get("trained") or {}
    if "mmlu_acc" not in dense or "arc_acc" not in dense:
        return ""
    mmlu, n = dense["mmlu_acc"], dense["mmlu_n"]
    error = math.sqrt(mmlu * (1 - mmlu) / n)
    reading = ("so at this size MMLU 5-shot can flag a broken model but cannot rank the methods"
               if mmlu - 0.25 < 2 * error else "so MMLU can rank the methods too")
    return (f"MMLU's 4 letters put chance at 0.25, and the unmodified model's {mmlu:.3f} on {n} questions (binomial "
            f"error {error:.3f}) is {(mmlu - 0.25) / error:.1f} errors above it, {reading}; ARC-Easy "
            f"({dense['arc_acc']:.3f} unmodified, chance 0.25) and the test loss carry the comparison.")


def block(results: dict[str, dict]) -> str:
    note = retrained_note(results)
    return (
        "**The grid on the test split** (step 1: INT3 / INT2 g32, seeds 0 1 2; step 2: INT4 g32 / g64; step 3: QLoRA /\n"
        "Q-BLoRA trained with QAT for INT3 / INT2 g32; the LRs chosen on the validation split below; 200 steps, batch 4;\n"
        "test loss on 250 chat Alpaca records; ARC-Easy test, first 1,000 questions, 0-shot; MMLU 5-shot, first 10\n"
        "test questions of each subject = 570; `bash bench/smollm2_grid.sh step1` (`step2`, `step3`; `SEEDS=2` for one\n"
        "seed first) fills `bench/results/accuracy_smollm2.json`; `python bench/smollm2_grid_table.py`\n"
        f"rewrites this block). {progress(results)}; {later_steps(results)}.\n\n"
        + compute_time(results).replace("\n", "; ") + "." + (f" {note}" if note else "") + "\n\n"
        + results_table(results) + "\n\n"
        + " ".join(f"![{label} of the deployed models]({plot_link(metric)})" for metric, label in PLOTS) + "\n\n"
        "One seed has no spread, so its cells show the value alone. Every method is at budget rank 8: QA-BLoRA's\n"
        "`k_out` is the smallest that keeps it within LoRA-8's count, and QA-LoRA's A is only d_in / g wide, so\n"
        "QA-BLoRA trains more parameters than QA-LoRA and fewer than QLoRA / Q-BLoRA. " + chance_note(results) + "\n\n"
        "The paper's comparisons as **paired differences** on the benchmark questions (A − B: each question's\n"
        "outcome averaged over a method's seeds, then the mean difference and its standard error over questions;\n"
        "why paired: `docs/benchmarks.md` (a)). One accuracy on 1,000 questions has a binomial error of ~0.016\n"
        "by itself, so read only |Δ / SE| well above 2 as a difference:\n\n"
        + claims_markdown(results) + "\n\n"
        f"**The paper's claims, read by rule** (`bench/accuracy.py`'s `claims_reading`, recomputed from the stored\n"
        f"rows: ARC-Easy acc's paired Δ / SE and the test loss's Δ over seeds / its SE; |Δ / SE| >= {NOISE_Z:g} counts,\n"
        "ARC-Easy decides and a loss that disagrees beyond noise makes it \"mixed\"; a side with one seed has no\n"
        "spread, so its loss is shown but not judged; a reading with fewer than 3 seeds a side is provisional):\n\n"
        + claims_reading(results)
    )


def seed_runs(results: dict[str, dict], seeds: set[int]) -> dict[str, dict]:
    """The rows of ``seeds`` (references, which have none, kept)."""
    return {k: row for k, row in results.items() if row.get("seed") is None or row["seed"] in seeds}


def qa_pair_comparison(rank8: dict[str, dict], ranked: dict[str, dict], base: str, label: str) -> str:
    """QA-BLoRA minus QA-LoRA (ARC-Easy acc, paired over questions; test loss) in ``rank8`` (column
    ``base``) and ``ranked`` (column ``label``), per INT format, on the seeds ``ranked`` has stored for both:
    the test of steps 4 and 5 (rank 8 vs another rank) and of INT2's own LR (INT3's LR vs INT2's)."""
    lines = [f"| deployed as | seeds | {base}: QA-BLoRA − QA-LoRA, ARC Δ (Δ/SE) | {label}: same | {base}: test loss Δ "
             f"| {label}: same |", "|---|---|---|---|---|---|"]
    formats = sorted({config_of(k).split("|")[1] for k in ranked if k.startswith(("qablora|", "qalora|"))},
                     key=format_order)
    for fmt in formats:
        seeds = set.intersection(*({row["seed"] for k, row in ranked.items() if config_of(k) == f"{method}|{fmt}"}
                                   for method in ("qablora", "qalora")))
        if not seeds:  # one of the pair not stored yet at this format: nothing to set side by side
            continue
        both = (seed_runs(rank8, seeds), seed_runs(ranked, seeds))
        cells = [arc_delta_cell(paired_difference(r, f"qablora|{fmt}", f"qalora|{fmt}", "arc_acc")) for r in both]
        losses = [loss_difference(r, f"qablora|{fmt}", f"qalora|{fmt}") for r in both]
        cells += ["—" if loss is None else f"{loss[0]:+.4f}" for loss in losses]
        shown = " ".join(str(s) for s in sorted(seeds))
        lines.append(f"| {format_name(fmt)} | {shown} | " + " | ".join(cells) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


def rank_file(rank: int, alpha: float | None = None, results_path: Path = RESULTS) -> Path:
    suffix = "" if alpha is None else f"_a{alpha:g}"
    return results_path.with_name(f"{results_path.stem}_r{rank}{suffix}.json")


def stored_per_seed(argv: list[str], results: dict[str, dict]) -> str:
    """``0 of 3 seeds so far (seed 0: 2 of 6 runs, ...)``: how much of the runs ``argv`` plans ``results`` holds."""
    args = parse_args(argv)
    runs = planned_runs(args)
    return per_seed(args, runs, [r for r in runs if is_done(args, r, results)])


def rank_progress(rank: int, alpha: float | None, results: dict[str, dict]) -> str:
    argv = ["--seeds", "0", "1", "2", "--rank", str(rank), "--bits", "3", "2", "--group-sizes", "32"]
    return stored_per_seed(argv + ([] if alpha is None else ["--alpha", f"{alpha:g}"]), results)


def rank_block(step: int, rank: int, alpha: float | None, why: str, ranked: dict[str, dict],
               rank8: dict[str, dict]) -> str:
    """Steps 4 and 5 (another budget rank, its own results file): what is stored, QA-BLoRA vs
    QA-LoRA at rank 8 beside this rank, and the claims read by the same rule."""
    env = "" if alpha is None else f"ALPHA={alpha:g} "
    title = f"budget rank {rank}" + ("" if alpha is None else f", alpha {alpha:g} (s = {alpha / rank:g})")
    head = (f"**Step {step}: {title}** (`{env}METHODS=\"qalora qablora\" SEEDS=0 bash bench/smollm2_grid.sh "
            f"step{step}` first, then\nthe other methods; own file `bench/results/{rank_file(rank, alpha).name}`; the "
            f"rank-8 data, steps and LRs).\n{why} ")
    if not ranked:
        return head + "Not started."
    comparison = qa_pair_comparison(rank8, ranked, "rank 8", f"rank {rank}")
    return (head + f"Stored: {rank_progress(rank, alpha, ranked)}.\n\n" + results_table(ranked) + "\n\n"
            + (f"QA-BLoRA vs QA-LoRA at both ranks, on the same seeds (those both have at rank {rank}; rank 8 restricted to them):"
               f"\n\n{comparison}\n\n" if comparison else "")
            + f"Step {step}'s claims, read by the same rule (fewer than 3 seeds a side: provisional):\n\n"
            + claims_reading(ranked))


def int2_lr_file(results_path: Path = RESULTS) -> Path:
    return results_path.with_name(f"{results_path.stem}_int2_lr.json")


def int2_sweep_files(results_path: Path = RESULTS) -> list[Path]:
    return sorted(results_path.parent.glob(f"{results_path.stem}_val_int2_qa[0-9]*.json"))


def qat_int2_sweep_files(results_path: Path = RESULTS) -> list[Path]:
    return sorted(results_path.parent.glob(f"{results_path.stem}_val_int2_qat_lr*.json"))


def qat_int2_sweep_block(sweep: list[Path]) -> str:
    """The baseline's side of INT2's LR question: QLoRA + QAT's own INT2 g32 validation sweep, chosen
    by the deployed model's loss (step 3 trains QLoRA + QAT at the NF4 LR)."""
    head = ("**QLoRA + QAT's own INT2 learning rate** (`bash bench/smollm2_grid.sh sweep_qat_int2`; seed 0, validation\n"
            "split, chosen by the deployed INT2 g32 model's loss). Step 3 trains QLoRA + QAT at the NF4 LR; the QA pair\n"
            "got INT2's own above, so this asks whether the baseline is under-tuned for INT2 in the same way:\n\n")
    sweep = [path for path in sweep if json.loads(path.read_text()).get("runs")]  # an unfinished run's file: no rows
    if not sweep:
        return head + "Not started."
    return head + "```\n" + lr_report([str(path) for path in sweep], criterion="deployed").strip() + "\n```"


def reference_losses(results: dict[str, dict]) -> str:
    """`` (the unmodified model's test loss: INT3 g32 3.40, INT2 g32 12.51)`` from the reference rows."""
    losses = {fmt: results[f"{REFERENCE}|{fmt}"]["low_bit"]["loss"] for fmt in ("int3_g32", "int2_g32")
              if "loss" in results.get(f"{REFERENCE}|{fmt}", {}).get("low_bit", {})}
    if not losses:
        return ""
    return " (the unmodified model's test loss: " + ", ".join(
        f"{format_name(fmt)} {loss:.2f}" for fmt, loss in losses.items()) + ")"


def int2_lr_block(tuned: dict[str, dict], results: dict[str, dict], sweep: list[Path],
                  method_lr: dict[str, float] | None = None) -> str:
    """QA-LoRA / QA-BLoRA at INT2 g32 trained at the LR INT2's own validation sweep chose (own file):
    what the sweep measured, the test rows, QA-BLoRA vs QA-LoRA at INT3's LR (step 1) beside INT2's on
    the same seeds, and the INT2 claims read against step 1's baselines (QLoRA + RTN, QLoRA + QAT)."""
    head = ("**INT2 at its own learning rate** (`bash bench/smollm2_grid.sh sweep_int2`, then `int2_lrs` and\n"
            f"`int2`; own file `bench/results/{int2_lr_file().name}`). Step 1 trains QA-LoRA and QA-BLoRA at the\n"
            "LR the INT3 g32 validation sweep chose for both widths. At INT2 the low-bit base starts far worse"
            + reference_losses(results) + ", so INT2 may want\n"
            "another LR - and QA-BLoRA's one zero-initialised matrix may want it more than QA-LoRA's two factors.\n"
            "INT2 g32's own sweep on the validation split (seed 0; the deployed INT2 model's val loss):\n\n")
    if not sweep:
        return head + "Not started."
    report = lr_report([str(path) for path in sweep])
    head += "```\n" + report.strip() + "\n```\n\n"
    if not tuned:
        return head + "Test runs not started."
    stored = stored_per_seed(["--seeds", "0", "1", "2", "--methods", "qalora", "qablora", "--bits", "2",
                              "--group-sizes", "32"], tuned)
    lrs = [f"{method_name(method)} {lr:g}" for method, lr in (method_lr or {}).items()]
    baselines = {k: row for k, row in results.items()
                 if config_of(k).split("|")[1] == "int2_g32" and not k.startswith(("qalora|", "qablora|"))}
    return (head + f"Test runs stored: {stored}" + (f"; LR: {', '.join(lrs)}" if lrs else "") + ".\n\n"
            + results_table(tuned) + "\n\n"
            "QA-BLoRA vs QA-LoRA at INT3's LR (step 1) and at INT2's own, on the same seeds:\n\n"
            + qa_pair_comparison(results, tuned, "INT3's LR", "INT2's LR") + "\n\n"
            "The INT2 claims with the QA-* rows at INT2's own LR and step 1's baselines (QLoRA / Q-BLoRA trained\n"
            "once at their NF4 LR, then RTN; with QAT from step 3), read by the same rule (fewer than 3 seeds a\n"
            "side: provisional):\n\n" + claims_reading({**baselines, **tuned}))


def main() -> None:
    results = json.loads(RESULTS.read_text())["runs"]
    text = block(results)
    for step, rank, alpha, why in RANK_STEPS:
        path = rank_file(rank, alpha)
        ranked = json.loads(path.read_text())["runs"] if path.is_file() else {}
        text += "\n\n" + rank_block(step, rank, alpha, why, ranked, results)
    tuned_path = int2_lr_file()
    stored = json.loads(tuned_path.read_text()) if tuned_path.is_file() else {"runs": {}, "settings": {}}
    text += "\n\n" + int2_lr_block(stored["runs"], results, int2_sweep_files(), stored["settings"].get("method_lr"))
    text += "\n\n" + qat_int2_sweep_block(qat_int2_sweep_files())
    print(text)
    s = RESULTS_DOC.read_text()
    start = s.index("<!-- grid:start -->\n") + len("<!-- grid:start -->\n")
    end = s.index("\n<!-- grid:end -->", start)
    RESULTS_DOC.write_text(s[:start] + text + s[end:])
    for path in write_plots(results):
        print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
