"""Accuracy at equal trainable parameters: every method, several bit widths, several seeds.

    python bench/accuracy.py                                         # embedded model + data
    python bench/accuracy.py --data ../shared/data/alpaca_5000.json --tag alpaca
    python bench/accuracy.py --seeds 0 1 2 --bits 4 3 2 --group-sizes 32 64 --steps 100

One *run* fine-tunes one method on one base with one seed (Lightning ``Trainer.fit``, the
same steps, batch, warm-up + constant schedule, gradient clipping and data order for every
method) and then scores the **held-out test split** (never seen in training or tuning):

* ``loss`` - per-token response cross-entropy (what ``main.py test`` reports as ``test/loss``);
* ``exact_match`` - the fraction of test records whose whole reference response, *including
  the end-of-sequence token*, is the model's argmax at every response position given the
  reference prefix. Under greedy decoding that is exactly the condition for generating the
  reference token for token, so this is greedy exact match computed in one forward pass
  (``tests/bench/test_accuracy_harness.py`` checks it against ``model.generate``). Reported
  only where responses are short answers (the embedded set); for free text it is ~0.

The low-bit model each method deploys:

* QLoRA / Q-BLoRA train on an NF4 base and merge into dense weights; to ship INT-b they are
  re-quantized after training (round-to-nearest, group ``g``): ``qlora+ptq`` rows;
* QA-LoRA / QA-BLoRA train on an INT-b group-``g`` base and merge *into* it exactly: the
  low-bit model is the trained model (its merged loss is measured, not assumed).

Every finished run is appended to ``--out`` immediately (JSON, written atomically), and runs
already there are skipped, so an interrupted sweep resumes where it stopped; the run that was
interrupted resumes from its last finished part (trained adapter, each scored model:
:class:`RunProgress`, ``<out stem>.partial/``). A finished QLoRA / Q-BLoRA run keeps its trained
adapter (``<out stem>.adapters/``, not committed), so a later call that asks for more
re-quantizations of it (``--bits`` / ``--group-sizes``) loads it instead of training again. The same command
started in two shells (``OMP_NUM_THREADS=1`` each, one per core) splits the runs between the two
workers: each claims a run before making it and merges its rows into the file as it is on disk
(:class:`ResultsStore`). ``--report-only`` prints the
table and plot from the JSON without training. Each method's learning rate is fixed up
front (``--lr`` for the LoRA family, ``--qa-lr`` for QA-*: their mean pooling over a
g-wide group shrinks the update by 1/g, see README; ``--method-lr`` per method), never
chosen on the test split: ``--eval-split val`` runs and ``--lr-report`` choose it on val.

Real models and benchmarks (issue 13)
-------------------------------------

* ``--prompt-template chat``: the tokenizer's chat template, loss on the assistant turn only
  (``InstructionDataModule``; ``alpaca`` is the default and what the embedded results used).
* ``--arc FILE [--arc-limit N]``: zero-shot multiple choice (lm-evaluation-harness's
  ``arc_easy`` protocol), stored as ``arc_acc`` / ``arc_acc_norm`` next to the loss of every
  deployed model (``row["low_bit"]``) and of the trained model (``row["trained"]``, as
  ``--bench-trained`` says: ``nf4`` scores only QLoRA / Q-BLoRA's NF4 + adapter, since QA-*'s
  trained model *is* its deployed model); ``--mmlu-dir DIR [--mmlu-k-shot 5]
  [--mmlu-limit-per-subject N]``: ``mmlu_acc`` (answer-letter logits). Limits take the first N
  questions in file order, the ones ``lm-eval --limit N`` scores. Nothing is scored unless asked.
* ``--reference``: once per results file, the unmodified model (no training, no seed): dense
  float32 (``reference|dense``, its scores in ``trained``) and RTN-quantized to every INT-b g
  this invocation deploys (``reference|int3_g32``, in ``low_bit``; exactly QA-*'s starting base).
* Time: every row records its run's ``train_seconds``, ``eval_seconds`` (all scoring of the
  run) and process ``cpu_seconds``; the report prints the totals (rows of one run counted once).
* A later invocation with other ``--bits`` / ``--group-sizes`` adds the missing RTN rows to a
  stored QLoRA / Q-BLoRA run by loading its kept adapter or retraining it with the same seed
  (bit-identical on the same machine: the stored trained scores are reused; on another CPU the
  kernels round differently - seen: held-out loss 1.934469 vs 1.934451 - and the new rows say
  ``retrained: true``; the report names them).
* Every row records the ``machine`` it ran on (CPU model, cores, the matrix ISA extensions its
  kernels may take, torch / bitsandbytes versions): times compare only within one machine, and
  the report counts the runs per machine.
* ``--rank R`` sets the budget rank; ``--alpha A`` the scaling numerator (default: the
  strategies' 16, so ``s = 16 / R``). Comparing ranks, keep ``A / R`` fixed: with Adam a
  single-matrix adapter's step in dW scales with ``s`` (rank 32 at alpha 16 under-trains QA-BLoRA).

The issue-13 grid: SmolLM2-135M-Instruct, chat-formatted Alpaca, ARC-Easy, MMLU 5-shot. Run
from the repository root; ``../shared/data`` is this project's data (alpaca_5000.json,
arc/ARC-Easy-Test.jsonl, mmlu/{dev,test}/*.csv)::

    MODEL=$(python scripts/fetch_smollm2.py --quiet)   # ~/.cache/qblora_pl/models/SmolLM2-135M-Instruct.Q4_1.gguf
    D=../shared/data
    COMMON="--model $MODEL --data $D/alpaca_5000.json --prompt-template chat --max-source-length 128
            --max-target-length 128 --batch-size 4 --eval-batch-size 8 --steps 200 --warmup 10 --no-exact-match"
    BENCH="--arc $D/arc/ARC-Easy-Test.jsonl --arc-limit 1000 --mmlu-dir $D/mmlu --mmlu-k-shot 5
           --mmlu-limit-per-subject 10"

    # 0. learning rates, on the validation split only (1 seed, INT3 g32; no benchmarks), then fixed:
    for pair in "3e-4 3e-3" "1e-3 1e-2" "3e-3 3e-2"; do set -- $pair
      python bench/accuracy.py $COMMON --eval-split val --seeds 0 --bits 3 --group-sizes 32 \
          --lr $1 --qa-lr $2 --tag smollm2_val_lr$1
    done
    python bench/accuracy.py --lr-report bench/results/accuracy_smollm2_val_lr*.json
    # prints "for the test runs: --method-lr qlora=... qblora=... qalora=... qablora=..."; if a
    # method's best LR is at an end of the grid, add the next factor-3 step for it first. Chosen
    # by the val loss of the model each method trains (QLoRA / Q-BLoRA: NF4 + adapter); the
    # deployed (RTN) model's choice is printed too (--lr-criterion deployed chooses by it).
    LRS="--method-lr qlora=... qblora=... qalora=... qablora=..."   # paste the printed values

    # 1. all four methods at INT3 and INT2 g32, 3 seeds, plus the unmodified references:
    python bench/accuracy.py $COMMON $BENCH $LRS --tag smollm2 --seeds 0 1 2 --bits 3 2 --group-sizes 32 \
        --reference --bench-trained nf4
    # 2. INT4 g32 / g64 (QLoRA / Q-BLoRA runs are retrained per seed to add their INT4 RTN rows):
    python bench/accuracy.py $COMMON $BENCH $LRS --tag smollm2 --seeds 0 1 2 --bits 4 --group-sizes 32 64 \
        --reference --bench-trained none
    # 3. QAT variants of QLoRA / Q-BLoRA at INT3 / INT2 g32 (QATSchedule start 20, ramp 30):
    python bench/accuracy.py $COMMON $BENCH $LRS --tag smollm2 --seeds 0 1 2 --methods qlora qblora \
        --qat-only --qat-bits 3 2 --group-sizes 32 --bench-trained none
    # 4. budget rank 32 (its own file; same fixed LRs; the references are rank-free, in step 1's file):
    python bench/accuracy.py $COMMON $BENCH $LRS --tag smollm2_r32 --rank 32 --seeds 0 1 2 --bits 3 2 \
        --group-sizes 32 --bench-trained none

    # report (tables for loss, arc_acc, arc_acc_norm, mmlu_acc; PNGs; CPU time):
    python bench/accuracy.py $COMMON $BENCH $LRS --tag smollm2 --report-only --markdown
    python bench/accuracy.py $COMMON $BENCH $LRS --tag smollm2_r32 --rank 32 --report-only --markdown

Why these numbers (timed here, 1 thread, 2 cores shared by other jobs at load 4-5):

* ``--steps 200`` at batch 4 x <= 256 tokens: 800 chat examples, about a sixth of the 4,498
  training records (one pass, no repeats). The session-3 QA-BLoRA fit's validation loss stopped
  improving by step 80-120 (README), so 200 leaves margin, and training is not what a run costs
  most: 200 steps take 18-22 min (QA-*) and 30-45 min (NF4) of one core here, scoring one
  benchmarked model ~23 min (below). QAT (start 20, ramp 30) has 150 steps at full strength.
* Without the scorer's prefix cache: ARC-Easy 0.65-0.76 s a question (dense, INT3), the first
  1,000 ~12 min per model; MMLU 5-shot, 10 per subject (570 questions, 358k prompt tokens, the
  5 shots make a prompt ~630 tokens on average) ~135 tokens/s, ~45 min per model, its 5-shot
  prefix recomputed for every question. With it (``LanguageModelScorer(prefix_cache=True)``, the
  default since these figures: each subject's header + shots and each ARC question run once,
  ``bench/prefix_cache.py``, SmolLM2, 1 thread, batch 8, load ~5): MMLU 5 subjects x 10 **4.3x**
  faster (4.50 -> 1.04 s a question, 101 -> 439 prompt tokens/s), ARC first 200 **1.75x**
  (1.10 -> 0.63 s; its prefixes are short, so the saved tokens matter less than the extra
  passes), every prediction equal, scores within 5e-5. So **~10 min** for MMLU and **~7 min**
  for ARC's 1,000 per model. Held-out loss (250 test records): ~6 min per model.
* So one benchmarked model is ~23 min: a QA-LoRA / QA-BLoRA run ~45 min (train, then its
  deployed model = trained model benchmarked); a QLoRA / Q-BLoRA run at INT3 + INT2 ~2 h (NF4
  model benchmarked with ``--bench-trained nf4``, merged loss check, two RTN models benchmarked);
  a reference ~23 min. Step 1: 3 references + 3 seeds x (2 x 2 h + 4 x 45 min) ~ 22 h of one
  core, ~11 h with two workers (the same command started twice). ``cpu_seconds`` /
  ``eval_seconds`` in the JSON give the real figures as the grid runs.
* The GGUF file is Q4_1 (asymmetric INT4, blocks of 32): its 210 quantized linear layers are
  already on the INT4 g32 grid (checked: ``GroupwiseInt(4, 32)`` reproduces every weight
  exactly), so ``reference|int4_g32`` is ``reference|dense`` up to float rounding, and "dense"
  means those dequantized weights, not the original bf16 model. INT4 g32 therefore shows
  adaptation without quantization damage; INT3 / INT2 and g64 do quantize.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import fcntl
import functools
import hashlib
import json
import math
import os
import statistics
import sys
import textwrap
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS = ("qlora", "qblora", "qalora", "qablora")
DENSE_MERGE = ("qlora", "qblora")  # trained on NF4, deployed by re-quantizing the merged weight
LABEL = {"qlora": "QLoRA", "qblora": "Q-BLoRA", "qalora": "QA-LoRA", "qablora": "QA-BLoRA"}
REFERENCE = "reference"  # the unmodified model (dense) and its RTN quantizations: no training, no seed
BENCH_METRICS = ("arc_acc", "arc_acc_norm", "mmlu_acc")
# Options added after results were stored: left out of a file's settings while at these values,
# so the files made before them (bench/results/) still match and resume.
NEW_OPTION_DEFAULTS = {"prompt_template": "alpaca", "arc": None, "arc_limit": None, "mmlu_dir": None,
                       "mmlu_limit_per_subject": None, "mmlu_k_shot": 5, "method_lr": None, "alpha": None,
                       "base_init": "rtn", "calibration_records": 128, "calibration_seq_len": 512, "scale_rank": 0}


MATRIX_ISA = ("amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx512f", "avx2")  # what CPU kernels dispatch on


@functools.lru_cache(maxsize=1)
def machine() -> dict:
    """The machine a run's times and last-digit rounding belong to: CPU model, cores, the matrix
    ISA extensions its kernels may use (AMX / AVX512-BF16 change both speed and rounding), and
    the torch / bitsandbytes versions."""
    import importlib.metadata as metadata
    import platform

    name, flags = platform.processor() or platform.machine(), set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            field, _, value = line.partition(":")
            if field.strip() == "model name":
                name = value.strip()
            elif field.strip() == "flags":
                flags = set(value.split())
                break
    versions = {}
    for package in ("torch", "bitsandbytes"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    return {"cpu": name, "cores": os.cpu_count(), "isa": [f for f in MATRIX_ISA if f in flags], **versions}


def machine_label(row: dict) -> str:
    """One line naming a row's machine; older rows did not record it."""
    m = row.get("machine")
    if not m:
        return "not recorded"
    isa = "/".join(m["isa"]) or "no AVX2"
    return f"{m['cpu']}, {m['cores']} cores, {isa}, torch {m.get('torch', '?')}, bitsandbytes {m.get('bitsandbytes', '?')}"


def run_key(method: str, seed: int | None, bits: int | None, group_size: int | None, qat: bool = False) -> str:
    if method == REFERENCE:
        return f"{REFERENCE}|{'dense' if bits is None else f'int{bits}_g{group_size}'}"
    base = "nf4" if bits is None else f"int{bits}_g{group_size}"
    return f"{method}{'+qat' if qat else ''}|{base}|seed{seed}"


def config_of(key: str) -> str:
    """A run key without its seed: one row of the tables (reference rows have no seed)."""
    return key if key.startswith(REFERENCE + "|") else key.rsplit("|", 1)[0]


def run_of(key: str, row: dict) -> str:
    """The key of the training run (or reference evaluation) a row came from; several rows share one.

    Rows record it as ``run``; older rows did not: a ``+ptq`` row comes from its method's NF4 run.
    """
    if "run" in row:
        return row["run"]
    method = key.split("|")[0]
    if method.endswith("+ptq"):  # the row's own "method" is the trained one
        return run_key(method.split("+")[0], row["seed"], None, None)
    return key


def format_name(base: str) -> str:
    """``int3_g32`` -> ``INT3 g32``."""
    return base.replace("int", "INT").replace("_g", " g")


def format_order(base: str) -> tuple[int, int]:
    """Sort key of ``int<b>_g<g>`` formats: widest first, then smaller groups."""
    return -int(base[3]), int(base.split("_g")[1])


def method_name(method: str) -> str:
    """``qlora+ptq`` -> ``QLoRA + RTN``, ``qblora+qat`` -> ``Q-BLoRA + QAT + RTN``, ``qlora+libgptq`` ->
    ``QLoRA + GPTQ (llm-compressor)``."""
    family, _, variant = method.partition("+")
    return LABEL[family] + {"ptq": " + RTN", "qat": " + QAT + RTN", "libgptq": " + GPTQ (llm-compressor)"}.get(variant, "")


def scored_part(config: str) -> str:
    """Which part of a ``method|base`` config's rows its scores are read from: the trained model
    for NF4 + adapter and the dense reference, else the deployed low-bit model."""
    return "trained" if config.endswith(("|nf4", "|dense")) else "low_bit"


def build(method: str, rank: int, bits: int | None, group_size: int | None, alpha: float | None = None,
          base: dict | None = None, scale_rank: int = 0):
    """(quantization backend, adapter strategy) of a method at one budget rank, dropout 0; ``alpha``
    None keeps each strategy's default (16: scaling ``s = 16 / rank``); ``base``: the INT-b base's
    ``init`` / calibration arguments (:func:`base_args`); ``scale_rank``: QA-* learned group scales."""
    from qblora_pl.adapters import LoRA, QABLoRA, QALoRA, QBLoRA
    from qblora_pl.quantization import NF4, GroupwiseInt

    scale = {} if alpha is None else {"alpha": alpha}
    if method == "qlora":
        return NF4(), LoRA(r=rank, dropout=0.0, **scale)
    if method == "qblora":
        return NF4(), QBLoRA(r=rank, dropout=0.0, **scale)
    base = GroupwiseInt(bits=bits, group_size=group_size, **(base or {}))
    if method == "qalora":
        return base, QALoRA(r=rank, dropout=0.0, scale_rank=scale_rank, **scale)
    if method == "qablora":
        return base, QABLoRA(budget_rank=rank, dropout=0.0, scale_rank=scale_rank, **scale)
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def base_args(args) -> dict:
    """``--base-init`` and its calibration as ``GroupwiseInt`` arguments (QA-* bases and the references)."""
    return {"init": args.base_init, "calibration_records": args.calibration_records,
            "calibration_seq_len": args.calibration_seq_len}


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


def learning_rate(settings: dict, method: str) -> float:
    """A method's LR: ``--method-lr METHOD=LR`` if given, else ``--lr`` (LoRA family) or ``--qa-lr`` (QA-*).

    QAT and ``+ptq`` rows train with their method's LR. ``settings``: the options (or a results
    file's settings, where ``method_lr`` is absent when it was not given).
    """
    family = method.split("+")[0]
    default = settings["lr"] if family in DENSE_MERGE else settings["qa_lr"]
    return (settings.get("method_lr") or {}).get(family, default)


def make_data(args, seed: int):
    from qblora_pl.data.datamodule import InstructionDataModule

    return InstructionDataModule(
        args.data, tokenizer_name_or_path=args.model_dir, batch_size=args.batch_size, eval_batch_size=args.eval_batch_size,
        prompt_template=args.prompt_template,
        max_source_length=args.max_source_length, max_target_length=args.max_target_length,
        split_seed=0, shuffle_seed=seed,  # a fixed split; the seed sets the init and the data order
        val_fraction=args.holdout_fraction, test_fraction=args.holdout_fraction,
        drop_empty=True,  # Alpaca has records with an empty output; dropped after the split, so it is unchanged
    )


def make_evaluator(args, data, device) -> Evaluator:
    """The held-out batches (``--eval-split``, ``--test-batches``) and benchmarks every model of a run is scored on."""
    batches = eval_batches(data, device, args.test_batches, args.eval_split)
    return Evaluator(batches, data.tokenizer, benchmark_tasks(args), args.eval_batch_size, args.progress)


def train_one(args, method: str, seed: int, bits: int | None, group_size: int | None,
              qat_bits: int | None = None, qat_group_size: int | None = None, progress: RunProgress | None = None):
    """Fine-tune one method with one seed; returns (module, datamodule, seconds).

    ``progress``: where a killed attempt of this run saved its trained adapter; then the model
    is built as for training and the adapter loaded (``seconds``: the saved training time), and
    a newly trained adapter is saved there.
    """
    import lightning.pytorch as pl

    from qblora_pl.module import QuantizedCausalLM

    pl.seed_everything(seed, verbose=False)
    quantization, adapter = build(method, args.rank, bits, group_size, args.alpha, base_args(args),
                                  getattr(args, "scale_rank", 0))
    lr = learning_rate(vars(args), method)
    module = QuantizedCausalLM(args.model_dir, quantization=quantization, adapter=adapter, learning_rate=lr, warmup_steps=args.warmup)
    data = make_data(args, seed)
    module.calibration_source = data.calibration_set  # a gptq base calibrates on the training split (split_seed 0)
    if progress is not None and progress.has_adapter():
        module.configure_model()
        seconds = progress.load_adapter(module)
        print(f"{progress.key}: trained adapter loaded from {progress.adapter_path()}", flush=True)
        return module, data, seconds
    if progress is not None and progress.scores():  # parts scored on another machine, whose adapter is not here
        progress.retrained = True
    callbacks = []
    if qat_bits is not None:
        from qblora_pl.callbacks.qat_schedule import QATSchedule

        callbacks.append(QATSchedule(start_step=args.qat_start, ramp_steps=args.qat_ramp, bits=qat_bits, group_size=qat_group_size))
    trainer = pl.Trainer(
        accelerator="auto", devices=1, max_steps=args.steps, logger=False, enable_checkpointing=False,
        limit_val_batches=0, enable_model_summary=False, enable_progress_bar=args.progress,
        gradient_clip_val=0.3, callbacks=callbacks, deterministic=False,
    )
    started = time.perf_counter()
    trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - started
    for layer in module.adapted_layers().values():
        layer.fake_quant = None  # evaluate the model itself; QAT only shaped its training
    if progress is not None:
        progress.save_adapter(module, seconds)
    return module, data, seconds


class RunProgress:
    """The finished parts of one run in progress - its trained adapter and each scored model -
    so that a run killed part-way (a session ends during a 2 h QLoRA run) resumes from its last
    finished part instead of from scratch.

    Kept in ``<out stem>.partial/<run>/`` next to the results file (``adapter.pt``: the trainable
    parameters and the training time; ``scores.json``: each part's scores and seconds), written
    atomically, tagged with the results file's settings (a directory made under other settings
    is discarded, not used), and removed once the run's rows are stored.

    ``keep``: where the trained adapter of a finished run goes when its rows are stored (QLoRA /
    Q-BLoRA: one training serves every re-quantization a later call asks for), tagged with the
    settings; ``has_adapter`` / ``load_adapter`` use it when no partial adapter is there. A kept
    adapter made under other settings is ignored (and replaced when the run is made again).

    ``scores.json`` is small and committed with the results (``adapter.pt``, 10 MB for SmolLM2, is
    not): a session that ends mid-run hands the next one - a fresh checkout, without the adapter -
    the parts it scored. That session retrains the run (same seed; training is deterministic on
    CPU), re-scores the trained model's held-out loss, and reuses the stored parts only if it
    equals the stored one (:meth:`check_retrained`); otherwise it scores everything again.
    """

    def __init__(self, out: Path, key: str, settings: dict, keep: bool = False) -> None:
        self.key, self.settings = key, settings
        self.retrained = False  # trained here while scores.json holds parts of another attempt
        self.loaded = False  # the adapter was loaded (partial or kept), not trained by this call
        name = key.replace("|", "_").replace(" ", "_")
        self.directory = out.with_name(out.stem + ".partial") / name
        self.kept = out.with_name(out.stem + ".adapters") / f"{name}.pt" if keep else None
        meta = self.directory / "settings.json"
        if self.directory.exists() and (not meta.is_file() or json.loads(meta.read_text()) != settings):
            print(f"{key}: discarding {self.directory}, made under other settings", flush=True)
            self.clear()

    def _start(self) -> None:
        from qblora_pl.atomic import atomic_file

        if not (self.directory / "settings.json").is_file():
            self.directory.mkdir(parents=True, exist_ok=True)
            with atomic_file(self.directory / "settings.json") as tmp:
                tmp.write_text(json.dumps(self.settings, indent=1))

    def adapter_path(self) -> Path | None:
        """The partial adapter of an interrupted attempt, else a kept one made under these settings."""
        if (self.directory / "adapter.pt").is_file():
            return self.directory / "adapter.pt"
        if self.kept is not None and self.kept.is_file():
            saved = torch.load(self.kept, map_location="cpu", weights_only=True)
            if saved.get("settings") == self.settings:
                return self.kept
            print(f"{self.key}: ignoring {self.kept}, made under other settings", flush=True)
        return None

    def has_adapter(self) -> bool:
        return self.adapter_path() is not None

    def save_adapter(self, module, seconds: float) -> None:
        from qblora_pl.atomic import atomic_file

        self._start()
        state = {name: p.detach().cpu().clone() for name, p in module.named_parameters() if p.requires_grad}
        with atomic_file(self.directory / "adapter.pt") as tmp:
            torch.save({"state": state, "train_seconds": seconds, "settings": self.settings}, tmp)

    def load_adapter(self, module) -> float:
        path = self.adapter_path()
        saved = torch.load(path, map_location="cpu", weights_only=True)
        trainable = {name: p for name, p in module.named_parameters() if p.requires_grad}
        if set(saved["state"]) != set(trainable):
            raise RuntimeError(f"{path} holds other parameters than {self.key} trains; delete it")
        with torch.no_grad():
            for name, value in saved["state"].items():
                trainable[name].copy_(value)
        self.loaded = True
        return saved["train_seconds"]

    def scores(self) -> dict[str, dict]:
        path = self.directory / "scores.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def check_retrained(self, model, evaluate) -> None:
        """After retraining (no saved adapter): keep the stored parts only if the retrained model's
        held-out loss equals the stored trained loss - the same model - else drop them."""
        if not self.retrained:
            return
        self.retrained = False
        stored = self.scores().get("trained")
        loss = evaluate(model, benchmarks=False)["loss"] if stored else None
        if stored and math.isclose(loss, stored["scores"]["loss"], rel_tol=1e-6, abs_tol=0.0):
            print(f"{self.key}: retrained model's held-out loss {loss:.6f} equals the interrupted attempt's; "
                  f"its scored parts ({', '.join(self.scores())}) are reused", flush=True)
            return
        compared = f"{loss:.6f} vs {stored['scores']['loss']:.6f}" if stored else "not stored"
        print(f"{self.key}: the interrupted attempt's scores are not this model's (held-out loss {compared}); "
              "scoring everything", flush=True)
        (self.directory / "scores.json").unlink(missing_ok=True)

    def scored(self, part: str, evaluate, model, **kwargs) -> dict:
        """``evaluate(model, **kwargs)``, or the scores an earlier attempt stored for ``part``."""
        from qblora_pl.atomic import atomic_file

        done = self.scores()
        if part in done:
            evaluate.seconds += done[part]["seconds"]
            print(f"{self.key}: {part} scored by an interrupted attempt; reused", flush=True)
            return done[part]["scores"]
        before = evaluate.seconds
        result = evaluate(model, **kwargs)
        self._start()
        done = {**self.scores(), part: {"scores": result, "seconds": evaluate.seconds - before}}
        with atomic_file(self.directory / "scores.json") as tmp:
            tmp.write_text(json.dumps(done, indent=1))
        shown = ", ".join(f"{m} {result[m]:.4f}" for m in ("loss", *BENCH_METRICS) if m in result)
        print(f"{self.key}: {part} scored ({shown}; {evaluate.seconds - before:.0f}s)", flush=True)
        return result

    def clear(self, keep_adapter: bool = True) -> None:
        """Remove the partial parts of a run; its adapter moves to ``kept`` when one is asked for and
        ``keep_adapter`` (False when nothing was stored: the adapter is not the stored run's model)."""
        import shutil

        adapter = self.directory / "adapter.pt"
        if keep_adapter and self.kept is not None and adapter.is_file():
            self.kept.parent.mkdir(parents=True, exist_ok=True)
            os.replace(adapter, self.kept)  # same folder tree, so one atomic rename
        shutil.rmtree(self.directory, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.directory.parent.rmdir()  # the .partial folder, once no run is in progress


def eval_batches(data, device, limit: int | None, split: str = "test") -> list[dict[str, torch.Tensor]]:
    data.setup(split if split == "test" else "validate")
    batches = []
    for i, batch in enumerate(data.test_dataloader() if split == "test" else data.val_dataloader()):
        if limit is not None and i >= limit:
            break
        batches.append({k: v.to(device) for k, v in batch.items()})
    return batches


def missing_formats(args, method: str, seed: int, results: dict[str, dict]) -> list[tuple[int, int]]:
    """The ``--bits`` x ``--group-sizes`` re-quantizations of a QLoRA / Q-BLoRA run not yet in ``results``."""
    return [(b, g) for b in args.bits for g in args.group_sizes if run_key(method + "+ptq", seed, b, g) not in results]


def missing_library_formats(args, method: str, seed: int, results: dict[str, dict]) -> list[tuple[int, int]]:
    """``--library-gptq``: the merged QLoRA / Q-BLoRA model's llm-compressor GPTQ rows not yet in ``results``."""
    if not getattr(args, "library_gptq", False):
        return []
    return [(b, g) for b in args.bits for g in args.group_sizes
            if run_key(method + "+libgptq", seed, b, g) not in results]


def wants_trained_benchmarks(args, method: str) -> bool:
    """Whether ``--bench-trained`` asks for the benchmarks of ``method``'s trained (not deployed) model."""
    return args.bench_trained == "all" or (args.bench_trained == "nf4" and method in DENSE_MERGE)


def missing_trained_benchmarks(args, method: str, seed: int, results: dict[str, dict]) -> list[str]:
    """The benchmarks (``arc``, ``mmlu``) ``--bench-trained`` asks of a stored QLoRA / Q-BLoRA run's trained
    model that its NF4 row lacks - it was made under ``--bench-trained none`` (steps 4-5 of the grid);
    a later call scores them from the run's kept adapter, without training again."""
    row = results.get(run_key(method, seed, None, None))
    if row is None or method not in DENSE_MERGE or not wants_trained_benchmarks(args, method):
        return []
    trained = row.get("trained") or {}
    return [task.name for task in benchmark_tasks(args) if f"{task.name}_acc" not in trained]


def is_done(args, run: tuple, results: dict[str, dict]) -> bool:
    """A run is done when its row is stored; a QLoRA / Q-BLoRA run also needs every requested
    re-quantization and the trained model's requested benchmarks."""
    method, seed, bits, g, qat = run
    if run_key(*run) not in results:
        return False
    return method not in DENSE_MERGE or qat or not (missing_formats(args, method, seed, results)
                                                    or missing_library_formats(args, method, seed, results)
                                                    or missing_trained_benchmarks(args, method, seed, results))


def run_method(args, method: str, seed: int, bits: int | None, group_size: int | None, qat: bool = False,
               stored: dict[str, dict] | None = None, progress: RunProgress | None = None) -> dict[str, dict]:
    """Train once and return every row this run yields (QA-*: one; QLoRA/Q-BLoRA: trained + PTQ).

    ``qat``: train QLoRA / Q-BLoRA with the QATSchedule callback fake-quantizing the merged
    weight to INT-``bits`` group ``group_size``, then re-quantize to exactly that grid.

    Every row records ``train_seconds`` and ``eval_seconds`` of the whole run (rows of one run
    share them; ``run`` names the run; ``main`` adds the run's process ``cpu_seconds``) and the
    benchmarks asked for next to the loss: the deployed low-bit model always, the trained model
    as ``--bench-trained`` says.

    ``progress``: the run's finished parts from a killed attempt (:class:`RunProgress`), reused.

    ``stored``: rows already made. A QLoRA / Q-BLoRA run whose NF4 row is stored is being
    re-run for re-quantizations a later invocation asks for (``--bits`` / ``--group-sizes``):
    it retrains with the same seed, returns only the missing ``+ptq`` rows, and does not score
    the trained model's benchmarks again. Where the retrained model's held-out loss equals the
    stored one (the same model: training is deterministic on CPU), the new rows reuse the
    stored trained scores; otherwise they keep their own and say ``retrained: true``. A stored
    run whose trained model lacks benchmarks ``--bench-trained`` now asks for (it ran under
    ``none``) is scored on them the same way, and its stored rows come back with them added.
    """
    from qblora_pl.merging import merge_adapters, requantize_merged, unmerge_adapters

    stored = stored or {}
    bench_trained = wants_trained_benchmarks(args, method)
    key = run_key(method, seed, bits, group_size, qat=qat)
    scored = progress.scored if progress is not None else lambda part, ev, m, **kw: ev(m, **kw)
    fill_seconds, refreshed = 0.0, {}
    if qat:
        module, data, seconds = train_one(args, method, seed, None, None, qat_bits=bits, qat_group_size=group_size,
                                          progress=progress)
        model, evaluate = module.model, make_evaluator(args, data, module.device)
        if progress is not None:
            progress.check_retrained(model, evaluate)
        trained = scored("trained", evaluate, model, benchmarks=bench_trained)
        merge_adapters(model)
        requantize_merged(model, bits=bits, group_size=group_size)
        row = {"method": method + "+qat", "seed": seed, "base": "nf4", "bits": bits, "group_size": group_size,
               "trainable_params": sum(p.numel() for p in module.parameters() if p.requires_grad),
               "train_seconds": seconds, "qat_start": args.qat_start, "qat_ramp": args.qat_ramp,
               "trained": trained, "low_bit": scored("low_bit", evaluate, model)}
        unmerge_adapters(model)
        rows = {key: row}
    else:
        module, data, seconds = train_one(args, method, seed, bits, group_size, progress=progress)
        model, evaluate = module.model, make_evaluator(args, data, module.device)
        if progress is not None:
            progress.check_retrained(model, evaluate)
        params = sum(p.numel() for p in module.parameters() if p.requires_grad)
        previous = stored.get(key) if method in DENSE_MERGE else None
        fill = bool(previous) and bool(missing_trained_benchmarks(args, method, seed, stored))
        before = evaluate.seconds
        trained = scored("trained", evaluate, model, benchmarks=bench_trained and (previous is None or fill))
        fill_seconds = evaluate.seconds - before if fill else 0.0
        how = merge_adapters(model)
        common = {"method": method, "seed": seed, "trainable_params": params, "train_seconds": seconds}
        rows = {}
        if method in DENSE_MERGE:
            formats = missing_formats(args, method, seed, stored) if previous else \
                [(b, g) for b in args.bits for g in args.group_sizes]
            if previous is None:
                merged = scored("merged", evaluate, model, benchmarks=False)  # dense + adapter: the trained model up to rounding
                rows[key] = {**common, "base": "nf4", "trained": trained, "merged": merged, "low_bit": None}
            elif math.isclose(trained["loss"], previous["trained"]["loss"], rel_tol=1e-6, abs_tol=0.0):
                if fill:  # the stored model's benchmarks, added to its stored scores and to its +ptq rows' copies
                    trained = fill_trained_benchmarks(previous["trained"], trained)
                    refreshed = refreshed_rows(stored, method, seed, trained, fill_seconds)
                else:
                    trained = previous["trained"]
                if progress is not None and progress.loaded:  # the stored run's own adapter: no training here
                    common["adapter_reused"] = True
            else:
                print(f"warning: {key} retrained for {formats or 'its trained benchmarks'} is not the stored model "
                      f"(held-out loss {trained['loss']:.6f} vs {previous['trained']['loss']:.6f})"
                      + ("; its rows say retrained: true" if formats else "")
                      + ("; its trained benchmarks are not stored (the stored model's kept adapter is not here)"
                         if fill else ""))
                common["retrained"] = True
            for ptq_bits, g in formats:
                unmerge_adapters(model)
                merge_adapters(model)
                requantize_merged(model, bits=ptq_bits, group_size=g)
                rows[run_key(method + "+ptq", seed, ptq_bits, g)] = {
                    **common, "base": "nf4", "bits": ptq_bits, "group_size": g, "trained": trained,
                    "low_bit": scored(f"int{ptq_bits}_g{g}", evaluate, model),
                }
            library = missing_library_formats(args, method, seed, stored)
            if library:
                from bench.library_pipeline import library_gptq_model

                calibration = data.calibration_set(args.calibration_records, args.calibration_seq_len)
            for lib_bits, g in library:  # the users' pipeline: merge, then the library's GPTQ
                unmerge_adapters(model)
                how = merge_adapters(model)
                started = time.perf_counter()
                deployed, record = library_gptq_model(model, how, args.model_dir, calibration, lib_bits, g,
                                                      threads=torch.get_num_threads())
                rows[run_key(method + "+libgptq", seed, lib_bits, g)] = {
                    **common, "base": "nf4", "bits": lib_bits, "group_size": g, "trained": trained,
                    "library_gptq": {**record, "pipeline_seconds": time.perf_counter() - started},
                    "low_bit": scored(f"libgptq_int{lib_bits}_g{g}", evaluate, deployed),
                }
                del deployed
            if previous is not None and (formats or library):
                key += " again for " + ", ".join([f"int{b}_g{g}" for b, g in formats]
                                                 + [f"libgptq int{b}_g{g}" for b, g in library])  # own time in totals
        else:
            assert set(how.values()) == {"offsets"}, how
            rows[key] = {
                **common, "base": f"int{bits}_g{group_size}", "bits": bits, "group_size": group_size,
                "trained": trained, "low_bit": scored("low_bit", evaluate, model),
            }
        unmerge_adapters(model)
    for row in rows.values():
        row.update(eval_seconds=evaluate.seconds - fill_seconds, run=key)
    return {**rows, **refreshed}


def fill_trained_benchmarks(stored: dict, scored: dict) -> dict:
    """A stored trained model's scores plus the benchmarks ``scored`` (the same model, scored again) adds."""
    hits = {**scored.get("hits", {}), **stored.get("hits", {})}  # what was stored stays as it was
    return {**scored, **stored, **({"hits": hits} if hits else {})}


def refreshed_rows(stored: dict[str, dict], method: str, seed: int, trained: dict, seconds: float) -> dict[str, dict]:
    """The stored rows of ``method``'s NF4 run (its NF4 row and every ``+ptq`` row, which copy its trained
    scores) with ``trained`` in place; the NF4 row adds the time it took (``trained_benchmark_seconds``)."""
    rows, nf4 = {}, run_key(method, seed, None, None)
    for key, row in stored.items():
        if row.get("seed") == seed and key.split("|")[0] in (method, method + "+ptq", method + "+libgptq"):  # not +qat
            rows[key] = {**row, "trained": trained}
            if key == nf4:
                rows[key]["trained_benchmark_seconds"] = row.get("trained_benchmark_seconds", 0.0) + seconds
    return rows


def run_reference(args, bits: int | None, group_size: int | None) -> dict[str, dict]:
    """The unmodified model, dense float32 (``bits`` None) or quantized to INT-``bits`` g (``--base-init``), scored untrained.

    Scored on the same held-out batches and benchmarks as the trained runs. The INT-b model is
    exactly the base QA-LoRA / QA-BLoRA start from (``GroupwiseInt`` rounds the float32 weights).
    Dense: ``trained`` holds its scores (it is not a low-bit model); INT-b: ``low_bit``.
    """
    from qblora_pl.quantization import GroupwiseInt, NoQuantization

    started = time.perf_counter()
    if bits is None:
        quantization = NoQuantization(compute_dtype="float32")
    else:
        quantization = GroupwiseInt(bits=bits, group_size=group_size, **base_args(args))
    data = make_data(args, seed=0)
    model = quantization.load(args.model_dir, calibration=data.calibration_set).eval()
    load_seconds = time.perf_counter() - started
    evaluate = make_evaluator(args, data, next(model.parameters()).device)
    scores = evaluate(model)
    key = run_key(REFERENCE, None, bits, group_size)
    base = key.split("|")[1]
    return {key: {"method": REFERENCE, "seed": None, "base": base, "bits": bits, "group_size": group_size,
                  "trainable_params": 0, "train_seconds": 0.0, "load_seconds": load_seconds,
                  "eval_seconds": evaluate.seconds, "run": key,
                  "trained": scores if bits is None else None, "low_bit": None if bits is None else scores}}


def reference_runs(args) -> list[tuple[str, None, int | None, int | None, bool]]:
    """``--reference``: the dense model and its RTN quantization to every deployed INT-b g of this invocation."""
    if not args.reference:
        return []
    bits = set(args.qat_bits) if args.qat_only else set(args.bits) | set(args.qat_bits)
    return [(REFERENCE, None, None, None, False)] + [
        (REFERENCE, None, b, g, False) for b in sorted(bits, reverse=True) for g in args.group_sizes]


def planned_runs(args) -> list[tuple[str, int, int | None, int | None, bool]]:
    runs = []
    for seed in args.seeds:
        for method in args.methods:
            if method in DENSE_MERGE:
                if not args.qat_only:
                    runs.append((method, seed, None, None, False))
                runs.extend((method, seed, b, g, True) for b in args.qat_bits for g in args.group_sizes)
            elif not args.qat_only:
                runs.extend((method, seed, b, g, False) for b in args.bits for g in args.group_sizes)
    return runs


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


CLAIMS = (  # (A, B, what A vs B tests): configs without the format; "trained" = NF4 + adapter
    ("qblora|nf4", "qlora|nf4", "Q-BLoRA vs QLoRA, trained model (NF4 + adapter)"),
    ("qblora+ptq", "qlora+ptq", "Q-BLoRA + RTN vs QLoRA + RTN"),
    ("qablora", "qlora+ptq", "QA-BLoRA vs QLoRA + RTN"),
    ("qablora", "qalora", "QA-BLoRA vs QA-LoRA"),
    ("qblora+qat", "qlora+qat", "Q-BLoRA + QAT + RTN vs QLoRA + QAT + RTN"),
    ("qablora", "qlora+qat", "QA-BLoRA vs QLoRA + QAT + RTN"),
    ("qablora", REFERENCE, "QA-BLoRA vs the unmodified model + RTN"),
)


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


def _order(config: str):
    method, base = config.split("|")
    bits = int(base[3]) if base.startswith("int") else 16
    family = method.split("+")[0]
    return (-bits, base, -1 if family == REFERENCE else METHODS.index(family), method)


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


class ResultsStore:
    """One results file (``--out``) that several worker processes on this machine fill together.

    Start the same command twice (e.g. one per core, ``OMP_NUM_THREADS=1``) and the two split the
    planned runs: before a run, a worker *claims* it under an exclusive lock (``<out>.lock``),
    skipping runs already stored or claimed by a live process (claims: ``<out>.claims``,
    run key -> pid; a claim whose process has died - a killed session - is taken over). Each
    finished run is merged into the file as it is on disk *at that moment* and written atomically
    (temporary file + rename), so no worker overwrites another's rows and a crash mid-write
    leaves the previous file intact.
    """

    def __init__(self, path: Path, settings: dict):
        self.path, self.settings = path, settings
        self.lock_path = path.with_name(path.name + ".lock")
        self.claims_path = path.with_name(path.name + ".claims")  # not *.json: result globs skip it

    @contextlib.contextmanager
    def locked(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def read(self) -> dict:
        return json.loads(self.path.read_text()) if self.path.exists() else {"runs": {}}

    def load(self) -> dict:
        """The file's content (``settings``, ``runs``), read under the lock."""
        with self.locked():
            return self.read()

    def _claims(self) -> dict[str, int]:
        claims = json.loads(self.claims_path.read_text()) if self.claims_path.exists() else {}
        return {key: pid for key, pid in claims.items() if pid == os.getpid() or _alive(pid)}

    def _write(self, path: Path, payload: dict) -> None:
        from qblora_pl.atomic import atomic_file

        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps(payload, indent=1))

    def claim(self, args, run: tuple) -> dict[str, dict] | None:
        """The stored runs if ``run`` is now this process's to do; None if it is done or another's."""
        key = run_key(*run)
        with self.locked():
            results = self.read()["runs"]
            claims = self._claims()
            if is_done(args, run, results) or claims.get(key, os.getpid()) != os.getpid():
                return None
            claims[key] = os.getpid()
            self._write(self.claims_path, claims)
            return results

    def store(self, run: tuple, rows: dict[str, dict]) -> dict[str, dict]:
        """Merge ``rows`` into the file as it is now, release the claim; returns all stored runs."""
        with self.locked():
            results = {**self.read()["runs"], **rows}
            self._write(self.path, {"settings": self.settings, "runs": results})
            self._release(run)
            return results

    def release(self, run: tuple) -> None:
        """Give up the claim on ``run`` without storing anything."""
        with self.locked():
            self._release(run)

    def _release(self, run: tuple) -> None:
        claims = self._claims()
        claims.pop(run_key(*run), None)
        if claims:
            self._write(self.claims_path, claims)
        else:
            self.claims_path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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


if __name__ == "__main__":
    main()
