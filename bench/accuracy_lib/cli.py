"""Accuracy at equal trainable parameters: every method, several bit widths, several seeds.

    python bench/accuracy.py                                         # embedded model + data
    python bench/accuracy.py --data ../shared/data/alpaca_5000.json --tag alpaca
    python bench/accuracy.py --seeds 0 1 2 --bits 4 3 2 --group-sizes 32 64 --steps 100
    python bench/accuracy.py --report-only --markdown                # tables and plots of the stored runs
    python bench/accuracy.py --lr-report bench/results/accuracy_<tag>_val*.json   # LRs, chosen on val

A run fine-tunes one method (configs/<method>.yaml's base and adapter, at --rank, dropout 0) with
one seed and scores the held-out test split (``--eval-split val`` for choosing hyper-parameters):
the trained model and the low-bit model it deploys (QA-*: merged exactly into its INT-b base;
QLoRA / Q-BLoRA: merged, then re-quantized by round-to-nearest). Every finished run is stored in
bench/results/accuracy_<tag>.json at once; a later call skips the stored runs and resumes a killed
one, and the same command started twice splits the runs between the two processes.
What each option and each stored field is for, and the SmolLM2 grid (bench/smollm2_grid.sh):
docs/benchmarks.md, part (a).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

from bench.accuracy_lib.claims import claims_markdown, claims_reading
from bench.accuracy_lib.common import (
    BENCH_METRICS, DENSE_MERGE, METHODS, REFERENCE, ROOT, learning_rate, machine, run_key,
)
from bench.accuracy_lib.evaluation import benchmark_tasks
from bench.accuracy_lib.plan import is_done, planned_runs, reference_runs
from bench.accuracy_lib.progress import RunProgress
from bench.accuracy_lib.report import (
    compute_time, markdown_table, pivot_markdown, plot, present_metrics, print_table, retrained_note,
)
from bench.accuracy_lib.runs import run_method, run_reference
from bench.accuracy_lib.stats import NOISE_Z
from bench.accuracy_lib.store import ResultsStore
from bench.accuracy_lib.sweep import LR_CRITERIA, lr_report


# Options added after results were stored: left out of a file's settings while at these values,
# so the files made before them (bench/results/) still match and resume.
NEW_OPTION_DEFAULTS = {"prompt_template": "alpaca", "arc": None, "arc_limit": None, "mmlu_dir": None,
                       "mmlu_limit_per_subject": None, "mmlu_k_shot": 5, "method_lr": None, "alpha": None,
                       "base_init": "rtn", "calibration_records": 128, "calibration_seq_len": 512, "scale_rank": 0}


RUN_SELECTION = ("model_dir", "report_only", "progress", "out", "seeds", "methods", "bits", "group_sizes", "qat_bits", "qat_only",
                 "qat_start", "qat_ramp", "include", "markdown", "reference", "lr_report", "lr_criterion", "bench_trained",
                 "library_gptq")
"""Options that choose which runs / rows to make or show, not how a run is made (QAT rows record their schedule)."""


def run_settings(args) -> dict:
    """What every run in one results file shares (checked before adding runs to it, and by ``--include``)."""
    settings = {k: v for k, v in vars(args).items() if k not in RUN_SELECTION}
    settings["seed_sets"] = "adapter init, dropout and training order (split fixed)"
    if args.eval_split == "test":
        del settings["eval_split"]  # results stored before the option existed are test-split results
    for key, default in NEW_OPTION_DEFAULTS.items():
        if settings[key] == default or (key.startswith("arc_") and args.arc is None) \
                or (key.startswith("mmlu_") and args.mmlu_dir is None):
            del settings[key]
    return settings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options; ``--model`` given as a ``.gguf`` file becomes its converted HF directory."""
    from qblora_pl.paths import EMBEDDED_DATA_DIR, EMBEDDED_MODEL_DIR

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(EMBEDDED_MODEL_DIR))
    parser.add_argument("--data", default=str(EMBEDDED_DATA_DIR / "instructions"),
                        help="directory with train/val/test files, or one JSON file split by --holdout-fraction")
    parser.add_argument("--tag", default="embedded", help="names the output files")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    parser.add_argument("--group-sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--rank", type=int, default=8, help="budget rank: every method trains LoRA r=RANK's parameter count")
    parser.add_argument("--scale-rank", type=int, default=0,
                        help="QA-LoRA / QA-BLoRA also learn their group scales at this rank (docs/method.md section 7); "
                             "use its own --tag")
    parser.add_argument("--alpha", type=float, default=None,
                        help="scaling numerator, s = ALPHA / RANK (default: each strategy's 16); keep ALPHA / RANK "
                             "fixed when comparing ranks - with Adam a single-matrix adapter's step in dW scales with s")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-3, help="QLoRA / Q-BLoRA (configs/qlora.yaml, qblora.yaml)")
    parser.add_argument("--library-gptq", action="store_true",
                        help="also deploy QLoRA / Q-BLoRA the way users do today: merge, then llm-compressor's GPTQ "
                             "at each --bits / --group-sizes on the run's calibration tokens (+libgptq rows; needs "
                             "scripts/setup_library_gptq_venv.sh)")
    parser.add_argument("--base-init", default="rtn", choices=("rtn", "mse", "gptq"),
                        help="how QA-LoRA / QA-BLoRA's INT-b base (and --reference's INT-b rows) is made from the float "
                             "weights: GroupwiseInt(init=...); gptq calibrates on the training split")
    parser.add_argument("--calibration-records", type=int, default=128, help="--base-init gptq: training examples")
    parser.add_argument("--calibration-seq-len", type=int, default=512, help="--base-init gptq: tokens per example")
    parser.add_argument("--qa-lr", type=float, default=1e-2, help="QA-LoRA / QA-BLoRA (configs/qalora.yaml, qablora.yaml)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-batch-size", type=int, default=16)
    parser.add_argument("--max-source-length", type=int, default=256)
    parser.add_argument("--max-target-length", type=int, default=64)
    parser.add_argument("--holdout-fraction", type=float, default=0.05, help="val and test share of a single-file dataset")
    parser.add_argument("--test-batches", type=int, default=None, help="score only the first N test batches")
    parser.add_argument("--eval-split", choices=["test", "val"], default="test",
                        help="val: for choosing hyper-parameters (e.g. a learning rate) without touching the test split")
    parser.add_argument("--no-exact-match", action="store_true", help="free-text responses: report loss only")
    parser.add_argument("--qat-bits", type=int, nargs="*", default=[],
                        help="also train QLoRA / Q-BLoRA with QAT to INT-b (each --group-sizes) and re-quantize to it")
    parser.add_argument("--qat-only", action="store_true", help="run only the QAT runs (the rest may already be stored)")
    parser.add_argument("--qat-start", type=int, default=20, help="QATSchedule start_step")
    parser.add_argument("--qat-ramp", type=int, default=30, help="QATSchedule ramp_steps")
    parser.add_argument("--out", default=None, help="JSON results (default bench/results/accuracy_<tag>.json)")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--markdown", action="store_true", help="also print the tables as Markdown")
    parser.add_argument("--include", nargs="*", default=[],
                        help="also report the runs of these JSON files (same settings; e.g. QAT runs made in parallel)")
    parser.add_argument("--progress", action="store_true", help="Lightning progress bars for each run")
    parser.add_argument("--prompt-template", choices=["alpaca", "plain", "chat"], default="alpaca",
                        help="InstructionDataModule prompt_template (chat: the tokenizer's chat template, "
                             "loss on the assistant turns only)")
    parser.add_argument("--arc", default=None, metavar="FILE",
                        help="also score ARC (zero-shot, acc / acc_norm) on every trained and deployed model: "
                             "the official JSONL (e.g. ARC-Easy-Test.jsonl) or any ZeroShotMultipleChoice file")
    parser.add_argument("--arc-limit", type=int, default=None, help="the first N ARC questions (default all)")
    parser.add_argument("--mmlu-dir", default=None, metavar="DIR",
                        help="also score MMLU (k-shot, answer-letter logits): dev/ and test/ CSVs or dev/test.json")
    parser.add_argument("--mmlu-k-shot", type=int, default=5)
    parser.add_argument("--mmlu-limit-per-subject", type=int, default=None,
                        help="the first N test questions of each subject (default all)")
    parser.add_argument("--bench-trained", choices=["all", "nf4", "none"], default="all",
                        help="which trained (pre-deployment) models the benchmarks also score: all; nf4 = only "
                             "QLoRA / Q-BLoRA's NF4 + adapter (QA-*'s trained model is its deployed model, merged "
                             "exactly); none. Deployed low-bit models are always scored")
    parser.add_argument("--reference", action="store_true",
                        help="also score the unmodified model once: dense float32 and RTN to each INT-b g (no training)")
    parser.add_argument("--method-lr", nargs="+", default=None, metavar="METHOD=LR",
                        help="per-method learning rates (e.g. chosen by --lr-report on val), overriding --lr / --qa-lr")
    parser.add_argument("--lr-criterion", default="trained", choices=LR_CRITERIA,
                        help="--lr-report: choose each LR by the trained model's val score (QLoRA / Q-BLoRA: NF4 + "
                             "adapter) or by the deployed low-bit model's")
    parser.add_argument("--lr-report", nargs="+", default=None, metavar="JSON",
                        help="print each method's validation loss per LR over these --eval-split val files and exit")
    args = parser.parse_args(argv)
    if args.method_lr:
        method_lr = {}
        for item in args.method_lr:
            method, _, value = item.partition("=")
            if method not in METHODS or not value:
                parser.error(f"--method-lr {item!r}: expected METHOD=LR with METHOD one of {', '.join(METHODS)}")
            method_lr[method] = float(value)
        args.method_lr = {m: method_lr[m] for m in METHODS if m in method_lr}
    args.model_dir = args.model
    if args.model and not args.lr_report:  # a .gguf file: its converted HF directory (qblora_pl.sources)
        from qblora_pl.sources import pretrained_name_or_path

        args.model_dir = pretrained_name_or_path(args.model)
        args.model = model_identity(args.model, args.model_dir)
    return args


def model_identity(model: str, model_dir: str) -> str:
    """How a results file's settings name the model: a ``.gguf`` file by its name and content
    (``SmolLM2-135M-Instruct.Q4_1.gguf sha256:...``) - not by its conversion's cache directory,
    whose name hangs on the file's path and mtime, so the same file fetched on a fresh machine
    would read as another model and refuse to resume; any other source by what loads it."""
    if str(model).endswith(".gguf") and Path(model).expanduser().is_file():
        with open(Path(model).expanduser(), "rb") as handle:
            digest = hashlib.file_digest(handle, "sha256").hexdigest()
        return f"{Path(model).name} sha256:{digest[:16]}"
    return model_dir


def main(argv: list[str] | None = None) -> None:
    import logging

    args = parse_args(argv)
    if args.lr_report:
        print(lr_report(args.lr_report, criterion=args.lr_criterion))
        return
    if not args.progress:  # one line per run instead of Lightning's and the adapter table's output
        for name in ("lightning.pytorch", "lightning.fabric", "lightning_utilities"):
            logging.getLogger(name).setLevel(logging.WARNING)
    out = Path(args.out or ROOT / "bench" / "results" / f"accuracy_{args.tag}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = run_settings(args)
    store = ResultsStore(out, settings)
    stored = store.load()
    results: dict[str, dict] = stored["runs"]
    if results and stored.get("settings") != settings and not args.report_only:
        raise SystemExit(f"{out} holds runs made with other settings:\n  {stored.get('settings')}\n  now: {settings}\n"
                         "pass another --out (or --tag) or delete the file")

    runs = [] if args.report_only else reference_runs(args) + planned_runs(args)
    todo = [r for r in runs if not is_done(args, r, results)]
    print(f"{len(runs) - len(todo)} of {len(runs)} runs already in {out}; {len(todo)} to go")
    if todo:
        from qblora_pl.evaluation import check_tasks

        for name, n in check_tasks(benchmark_tasks(args)).items():  # a bad path fails now, not after training
            print(f"benchmark {name}: {n} questions")
    for i, (method, seed, bits, g, qat) in enumerate(todo, 1):
        key = run_key(method, seed, bits, g, qat)
        claimed = store.claim(args, (method, seed, bits, g, qat))
        if claimed is None:  # stored or being run by another worker since this one started
            print(f"[{i}/{len(todo)}] {key}: done or running in another process; skipped", flush=True)
            continue
        started, cpu_started = time.perf_counter(), time.process_time()
        print(f"[{i}/{len(todo)}] {key}: started {time.strftime('%H:%M:%S')}", flush=True)
        if method == REFERENCE:
            rows = run_reference(args, bits, g)
        else:
            progress = RunProgress(out, key, settings, keep=method in DENSE_MERGE and not qat)
            rows = run_method(args, method, seed, bits, g, qat, stored=claimed, progress=progress)
        if not rows:  # a stored run retrained elsewhere for its trained benchmarks: another model (the warning)
            store.release((method, seed, bits, g, qat))
            progress.clear(keep_adapter=False)  # the retrain is another model: not kept as the stored run's
            print(f"[{i}/{len(todo)}] {key}: nothing stored", flush=True)
            continue
        cpu_seconds = time.process_time() - cpu_started  # all threads, less moved by other jobs' load than the wall clock
        for name, row in rows.items():
            if name in claimed:  # a stored row given its trained model's benchmarks: its run keeps its own time
                if name == key:
                    row["trained_benchmark_cpu_seconds"] = row.get("trained_benchmark_cpu_seconds", 0.0) + cpu_seconds
                continue
            row["cpu_seconds"], row["machine"] = cpu_seconds, machine()
        results = store.store((method, seed, bits, g, qat), rows)  # nothing lost on a crash
        if method != REFERENCE:
            progress.clear()
        main_row = rows[key] if key in rows else next(iter(rows.values()))  # a re-run adds only +ptq rows
        scored = main_row["low_bit"] or main_row["trained"]
        bench = "".join(f", {m} {scored[m]:.3f}" for m in BENCH_METRICS if m in scored)
        if method == REFERENCE:
            losses = f"loss {scored['loss']:.4f}, exact match {scored['exact_match']:.3f}"
        else:
            shown = main_row["low_bit"] or main_row["merged"]
            losses = (f"trained loss {main_row['trained']['loss']:.4f}, deployed loss {shown['loss']:.4f}, "
                      f"exact match {shown['exact_match']:.3f}")
        print(f"[{i}/{len(todo)}] {key}: {losses}{bench} ({time.perf_counter() - started:.0f}s)", flush=True)

    results = store.load()["runs"] if todo else results  # with the rows other workers stored meanwhile
    for extra in args.include:
        other = json.loads(Path(extra).read_text())
        if other.get("settings") != settings:
            raise SystemExit(f"{extra} was made with other settings:\n  {other.get('settings')}\n  here: {settings}")
        results = {**results, **other["runs"]}
    metrics = present_metrics(results, exact_match=not args.no_exact_match)
    lrs = f"lr {args.lr} (QLoRA, Q-BLoRA) / {args.qa_lr} (QA-*)"
    if args.method_lr:
        lrs = "lr " + ", ".join(f"{m} {learning_rate(vars(args), m):g}" for m in METHODS)
    print(f"\n{args.tag}: {args.steps} steps, batch {args.batch_size}, budget rank {args.rank}, {lrs}, data {args.data}")
    benchmarks = {
        "arc": f"ARC 0-shot ({args.arc}, {'all questions' if args.arc_limit is None else f'first {args.arc_limit}'})",
        "mmlu": f"MMLU {args.mmlu_k_shot}-shot ({args.mmlu_dir}, "
                f"{'all' if args.mmlu_limit_per_subject is None else f'first {args.mmlu_limit_per_subject}'} per subject)",
    }
    print_table(results, metrics, args.eval_split, benchmarks)
    if args.markdown:
        for metric in metrics:
            print(f"\n{markdown_table(results, metric)}\n\n{pivot_markdown(results, metric)}")
        print(f"\nPaired differences on the benchmarks' questions:\n\n{claims_markdown(results)}")
        print(f"\nThe paper's claims, read by rule (|Δ / SE| >= {NOISE_Z:g}):\n\n{claims_reading(results)}")
    print(f"\n{compute_time(results)}")
    note = retrained_note(results)
    if note:
        print(note)
    for metric in metrics:
        png = out.with_name(f"{out.stem}_{metric}.png")
        where = "" if metric in BENCH_METRICS else "test "
        plot(results, metric, png, f"{args.tag}: deployed low-bit model, {where}{metric} (mean ± std over seeds)")
        print(f"wrote {png}")
    print(f"results: {out}")
