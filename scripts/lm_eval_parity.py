#!/usr/bin/env python
"""Peer check: our multiple-choice accuracies against lm-evaluation-harness on the same model and records.

Both tools score the same model on the same questions and this script prints, per set, both
tools' ``acc`` / ``acc_norm``, the per-question agreement of the predictions, whether every
prompt (context and continuation strings) is identical, and the largest log-likelihood
difference.

* **Zero-shot** (``--zero-shot``): the official ARC JSONL (``ARC-Easy-Test.jsonl``: nested
  ``question.stem`` / ``question.choices`` / ``answerKey``) or the hub's flattened ARC rows -
  lm-eval runs a local copy of its own ``arc_easy`` task (``doc_to_text`` / ``doc_to_choice`` /
  ``doc_to_target`` / metrics read from the installed ``lm_eval/tasks/arc/arc_easy.yaml``) on the
  file converted to the hub layout by this script; or the embedded generic set (``query``,
  ``choices``, ``gold``) as a plain ``multiple_choice`` task.
* **MMLU** (``--mmlu-dir``): the original CSV release (``dev/<subject>_dev.csv``,
  ``test/<subject>_test.csv``) or the embedded JSON layout - lm-eval runs one k-shot task per
  subject built from its own ``mmlu/default/_default_template_yaml`` (``first_n`` dev shots,
  ``doc_to_text``, letter choices) and the subject's ``description``, on data converted to the
  ``cais/mmlu`` layout (CSV read here with the ``csv`` module, independently of our reader).

Limits are lm-eval's ``--limit``: the first ``N`` documents of each task, i.e. of the ARC file
and of *each* MMLU subject - our side uses ``ZeroShotMultipleChoice(limit=N)`` and
``MMLU(limit_per_subject=N)``, which select the same questions.

The model is a Hugging Face directory, a ``.gguf`` file (converted once into a cached HF
directory by :func:`qblora_pl.sources.pretrained_name_or_path`; lm-eval's ``hf`` model loads that
directory), a hub name, or a native low-bit export (then both tools share our loaded model
object). Both sides run in float32. BOS: our scorer starts a text with BOS exactly when the
tokenizer's own special-token handling adds one (as training does); lm-eval gets
``add_bos_token`` set to the same answer (``True`` for the embedded model's tokenizer, ``False``
for SmolLM2's, whose BOS ``<|im_start|>`` is never added by its tokenizer - and which lm-eval's
``add_bos_token=True`` would force in front of every text). That is also what lm-eval does by
default (``add_bos_token`` unset: the tokenizer's own behaviour).

Usage::

    pip install -e ".[parity]"   # lm-eval 0.4.13
    python scripts/lm_eval_parity.py                          # the embedded model, embedded records
    python scripts/lm_eval_parity.py --model exports/<run>/native   # a merged native low-bit export
    python scripts/lm_eval_parity.py --model "$(python scripts/fetch_smollm2.py --quiet)" \\
        --zero-shot ../shared/data/arc/ARC-Easy-Test.jsonl --mmlu-dir ../shared/data/mmlu \\
        --k-shot 5 --mmlu-limit-per-subject 10 --json parity.json

Exit status 1 when a prediction or a prompt differs. ``compare()`` is the importable entry
point (tests).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from qblora_pl.evaluation import MMLU, LanguageModelScorer, ZeroShotMultipleChoice  # noqa: E402
from qblora_pl.evaluation.mmlu import LETTERS, format_subject, load_mmlu_split, mmlu_prompt  # noqa: E402
from qblora_pl.paths import EMBEDDED_DATA_DIR, EMBEDDED_MODEL_DIR  # noqa: E402

MULTIPLE_CHOICE_METRICS = [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                           {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]


# --------------------------------------------------------------------------------------------
# lm-eval's own task definitions
# --------------------------------------------------------------------------------------------


def lm_eval_task_yaml(*parts: str) -> dict[str, Any]:
    """A task YAML shipped with the installed lm-eval (``lm_eval/tasks/<parts>``), parsed."""
    import lm_eval.tasks
    import yaml

    path = Path(lm_eval.tasks.__file__).parent.joinpath(*parts)
    return yaml.safe_load(path.read_text())


def _task_file(workdir: Path, config: dict[str, Any]) -> str:
    # JSON is YAML: no quoting questions for Jinja templates and descriptions with newlines.
    (workdir / f"{config['task']}.yaml").write_text(json.dumps(config, indent=1))
    return config["task"]


def _write_json(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text(json.dumps(rows))
    return str(path)


def _local_data(test: str, dev: str | None = None) -> dict[str, Any]:
    files = {"test": test} if dev is None else {"test": test, "dev": dev}
    return {"dataset_path": "json", "dataset_kwargs": {"data_files": files}, "test_split": "test"}


# --------------------------------------------------------------------------------------------
# Independent readers (the lm-eval side's data; our side reads the source files itself)
# --------------------------------------------------------------------------------------------


def arc_rows_in_hub_layout(path: str | Path) -> list[dict[str, Any]]:
    """ARC JSONL/JSON rows in the hub's ``allenai/ai2_arc`` layout (official nested rows are flattened)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    rows = json.loads(text) if path.suffix == ".json" else [json.loads(line) for line in text.split("\n") if line.strip()]
    out = []
    for row in rows:
        if isinstance(row.get("question"), dict):
            choices = row["question"]["choices"]
            row = {"id": row.get("id", ""), "question": row["question"]["stem"],
                   "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]},
                   "answerKey": row["answerKey"]}
        out.append(row)
    return out


def mmlu_rows_in_hub_layout(mmlu_dir: str | Path, split: str, subjects: list[str] | None) -> dict[str, list[dict]]:
    """``{subject: [cais/mmlu rows]}`` of one split, in file order.

    The original CSV layout is read with the ``csv`` module directly (no code shared with our
    reader); any other layout goes through :func:`load_mmlu_split`.
    """
    split_dir = Path(mmlu_dir) / split
    by_subject: dict[str, list[dict]] = defaultdict(list)
    csvs = sorted(split_dir.glob(f"*_{split}.csv")) if split_dir.is_dir() else []
    if csvs:
        for path in csvs:
            subject = path.name[: -len(f"_{split}.csv")]
            if subjects is not None and subject not in subjects:
                continue
            with path.open(encoding="utf-8", newline="") as handle:
                for question, a, b, c, d, answer in csv.reader(handle):
                    by_subject[subject].append({"question": question, "subject": subject, "choices": [a, b, c, d],
                                                "answer": "ABCD".index(answer.strip())})
    else:
        for r in load_mmlu_split(str(mmlu_dir), split, subjects):
            by_subject[r["subject"]].append({"question": r["question"], "subject": r["subject"],
                                             "choices": r["choices"], "answer": r["label"]})
    return dict(by_subject)


def write_zero_shot_task(workdir: Path, path: str, record_format: str) -> str:
    """A local lm-eval task for the zero-shot file; returns its name."""
    if record_format == "arc":
        arc = lm_eval_task_yaml("arc", "arc_easy.yaml")
        data = _write_json(workdir / "zero_shot.json", arc_rows_in_hub_layout(path))
        config = {"task": "parity_zero_shot", **_local_data(data), "output_type": arc["output_type"],
                  **{k: arc[k] for k in ("doc_to_text", "doc_to_target", "doc_to_choice", "metric_list")}}
    elif record_format == "generic":
        rows = json.loads(Path(path).read_text()) if path.endswith(".json") else [
            json.loads(line) for line in Path(path).read_text().split("\n") if line.strip()]
        data = _write_json(workdir / "zero_shot.json", rows)
        config = {"task": "parity_zero_shot", **_local_data(data), "output_type": "multiple_choice",
                  "doc_to_text": "{{query}}", "doc_to_choice": "{{choices}}", "doc_to_target": "{{gold}}",
                  "metric_list": MULTIPLE_CHOICE_METRICS}
    else:
        raise SystemExit(f"{path}: record format {record_format!r}: the parity check supports arc and generic files")
    return _task_file(workdir, config)


def write_mmlu_tasks(workdir: Path, mmlu_dir: str, subjects: list[str] | None, k_shot: int) -> dict[str, str]:
    """One local lm-eval task per subject, from lm-eval's ``mmlu`` template; ``{subject: task name}``."""
    import lm_eval.tasks

    template = lm_eval_task_yaml("mmlu", "default", "_default_template_yaml")
    test, dev = mmlu_rows_in_hub_layout(mmlu_dir, "test", subjects), mmlu_rows_in_hub_layout(mmlu_dir, "dev", subjects)
    tasks = {}
    for subject in sorted(test):
        subject_yaml = Path(lm_eval.tasks.__file__).parent / "mmlu" / "default" / f"mmlu_{subject}.yaml"
        description = (lm_eval_task_yaml("mmlu", "default", f"mmlu_{subject}.yaml")["description"] if subject_yaml.is_file()
                       else f"The following are multiple choice questions (with answers) about {format_subject(subject)}.\n\n")
        name = f"parity_mmlu_{subject}"
        config = {"task": name,
                  **_local_data(_write_json(workdir / f"{name}_test.json", test[subject]),
                                _write_json(workdir / f"{name}_dev.json", dev.get(subject, []))),
                  **{k: v for k, v in template.items() if k not in ("dataset_path", "test_split", "metadata")},
                  "num_fewshot": k_shot, "description": description}
        tasks[subject] = _task_file(workdir, config)
    return tasks


def lm_eval_requests(workdir: Path, task_names: list[str], limit: int | None = None) -> dict[str, list[list[tuple]]]:
    """lm-eval's own request arguments ``(context, continuation)`` per document, no model needed.

    ``{task: [[(context, continuation) per choice] per document in doc order]}`` for the local
    tasks written into ``workdir`` - the exact strings lm-eval would score.
    """
    from lm_eval.tasks import TaskManager, get_task_dict

    tasks = get_task_dict(task_names, TaskManager(include_path=str(workdir)))
    out = {}
    for name in task_names:
        task = tasks[name]
        task.build_all_requests(limit=limit, rank=0, world_size=1)
        per_doc: dict[int, list[tuple]] = defaultdict(list)
        for instance in task.instances:
            per_doc[instance.doc_id].append(tuple(instance.args))
        out[name] = [per_doc[i] for i in sorted(per_doc)]
    return out


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def load_model(path: str):
    """Our side's model (float32, eval mode) and tokenizer, from any model source or a native export."""
    import torch

    from qblora_pl.quantization.native_checkpoint import load_native
    from qblora_pl.sources import load_causal_lm, load_tokenizer

    model = load_native(path) if is_native(path) else load_causal_lm(path, dtype=torch.float32)
    if torch.cuda.is_available():  # where lm-eval's hf model runs too
        model = model.to("cuda")
    tokenizer = load_tokenizer(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def is_native(model_path: str) -> bool:
    from qblora_pl.quantization.native_checkpoint import is_native_export

    return Path(model_path).is_dir() and is_native_export(model_path)


def lm_eval_model(model_path: str, batch_size: int, add_bos_token: bool, model=None, tokenizer=None):
    """lm-eval's ``HFLM``: on ``model`` when given, else on the model's own HF directory (a GGUF file's conversion)."""
    import torch
    from lm_eval.models.huggingface import HFLM

    from qblora_pl.sources import pretrained_name_or_path

    if model is not None:
        return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, add_bos_token=add_bos_token)
    return HFLM(pretrained=pretrained_name_or_path(model_path), dtype="float32",
                batch_size=batch_size, add_bos_token=add_bos_token, device="cuda" if torch.cuda.is_available() else "cpu")


# --------------------------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------------------------


def _samples(result: dict[str, Any], task: str) -> list[dict]:
    return sorted(result["samples"][task], key=lambda s: s["doc_id"])


def _lls(sample: dict) -> list[float]:
    return [float(r[0]) for r in sample["filtered_resps"]]


def _args(sample: dict) -> list[tuple[str, str]]:
    return [tuple(a) for a in sample["arguments"]]


def _argmax(values) -> int:
    values = [float(v) for v in values]
    return max(range(len(values)), key=values.__getitem__)


def compare(model_path: str = str(EMBEDDED_MODEL_DIR), mmlu_dir: str | None = str(EMBEDDED_DATA_DIR / "mmlu"),
            zero_shot_path: str | None = str(EMBEDDED_DATA_DIR / "zero_shot" / "test.json"), limit: int | None = None,
            k_shot: int = 5, batch_size: int = 16, model=None, tokenizer=None, *, subjects: list[str] | None = None,
            zero_shot_limit: int | None = None, mmlu_limit_per_subject: int | None = None,
            log=print) -> dict[str, dict[str, Any]]:
    """Run both sides; returns ``{task: {n, ours_acc, lm_eval_acc, ..., agreement, prompts_identical, max_abs_ll_diff}}``.

    ``limit`` is the default of both ``zero_shot_limit`` (first N questions of the zero-shot
    file) and ``mmlu_limit_per_subject`` (first N test questions of each subject); ``None``: all.
    ``mmlu_dir`` / ``zero_shot_path`` ``None`` skips that set.
    """
    import torch
    from lm_eval import evaluator
    from lm_eval.tasks import TaskManager

    zero_shot_limit = limit if zero_shot_limit is None else zero_shot_limit
    mmlu_limit_per_subject = limit if mmlu_limit_per_subject is None else mmlu_limit_per_subject
    started = time.perf_counter()
    shared = model is not None or is_native(model_path)  # lm-eval's hf model cannot load a native export itself
    if model is None:
        model, tokenizer = load_model(model_path)
    scorer = LanguageModelScorer(model, tokenizer, batch_size=batch_size, progress=True)
    lm = lm_eval_model(model_path, batch_size, bool(scorer.bos), model if shared else None, tokenizer if shared else None)
    log(f"models loaded ({time.perf_counter() - started:.0f} s)")
    report: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)

        def run(task_names: list[str], task_limit: int | None) -> dict[str, Any]:
            t0 = time.perf_counter()
            out = evaluator.simple_evaluate(model=lm, tasks=task_names, task_manager=TaskManager(include_path=str(workdir)),
                                            limit=task_limit, log_samples=True, bootstrap_iters=0, random_seed=0)
            log(f"lm-eval: {len(task_names)} task(s) in {time.perf_counter() - t0:.0f} s")
            return out

        if zero_shot_path:
            ours_zs = ZeroShotMultipleChoice(data_path=zero_shot_path, limit=zero_shot_limit)
            ours_zs.load_and_check()
            task = write_zero_shot_task(workdir, zero_shot_path, ours_zs.detected_format)
            theirs = run([task], zero_shot_limit)
            t0 = time.perf_counter()
            our_lls = ours_zs.choice_loglikelihoods(scorer)
            log(f"ours: zero-shot in {time.perf_counter() - t0:.0f} s")
            samples = _samples(theirs, task)
            if len(samples) != len(our_lls):
                raise RuntimeError(f"lm-eval scored {len(samples)} zero-shot questions, we scored {len(our_lls)}")
            hits = hits_norm = agree = same_prompt = 0
            diff = 0.0
            for record, ours, sample in zip(ours_zs.records, our_lls, samples):
                their = _lls(sample)
                lengths = [len(c) for c in record["choices"]]
                hits += _argmax(ours) == record["gold"]
                hits_norm += _argmax([ll / n for ll, n in zip(ours, lengths)]) == record["gold"]
                agree += _argmax(ours) == _argmax(their)
                same_prompt += _args(sample) == [(record["query"], ours_zs.target_delimiter + c) for c in record["choices"]]
                diff = max(diff, max(abs(x - y) for x, y in zip(ours, their)))
            n = len(our_lls)
            res = theirs["results"][task]
            report["zero_shot"] = {"n": n, "source": zero_shot_path, "format": ours_zs.detected_format,
                                   "ours_acc": hits / n, "lm_eval_acc": res["acc,none"],
                                   "ours_acc_norm": hits_norm / n, "lm_eval_acc_norm": res["acc_norm,none"],
                                   "agreement": agree / n, "prompts_identical": same_prompt / n, "max_abs_ll_diff": diff}

        if mmlu_dir:
            ours_mmlu = MMLU(data_path=mmlu_dir, k_shot=k_shot, subjects=subjects, limit_per_subject=mmlu_limit_per_subject)
            ours_mmlu.load_and_check()
            tasks = write_mmlu_tasks(workdir, mmlu_dir, subjects, k_shot)
            theirs = run(list(tasks.values()), mmlu_limit_per_subject)
            t0 = time.perf_counter()
            scores, _ = ours_mmlu.letter_logprobs(scorer)
            log(f"ours: MMLU in {time.perf_counter() - t0:.0f} s")
            their_by_subject = {s: _samples(theirs, name) for s, name in tasks.items()}
            cursor: dict[str, int] = defaultdict(int)
            hits = their_hits = agree = same_prompt = 0
            diff = 0.0
            for row, record in zip(scores, ours_mmlu.records):
                sample = their_by_subject[record["subject"]][cursor[record["subject"]]]
                cursor[record["subject"]] += 1
                their = _lls(sample)
                hits += _argmax(row) == record["label"]
                their_hits += _argmax(their) == record["label"]
                agree += _argmax(row) == _argmax(their)
                prompt = mmlu_prompt(record, ours_mmlu.shots.get(record["subject"], []))
                same_prompt += _args(sample) == [(prompt, f" {letter}") for letter in LETTERS]
                diff = max(diff, max(abs(float(x) - y) for x, y in zip(row, their)))
            counted = sum(len(v) for v in their_by_subject.values())
            if counted != len(ours_mmlu.records):
                raise RuntimeError(f"lm-eval scored {counted} MMLU questions, we scored {len(ours_mmlu.records)}")
            n = len(ours_mmlu.records)
            report[f"mmlu_{k_shot}shot"] = {"n": n, "subjects": len(tasks), "limit_per_subject": mmlu_limit_per_subject,
                                            "ours_acc": hits / n, "lm_eval_acc": their_hits / n, "agreement": agree / n,
                                            "prompts_identical": same_prompt / n, "max_abs_ll_diff": diff,
                                            "scoring": ours_mmlu.scoring}
    for result in report.values():
        result["bos"] = bool(scorer.bos)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(EMBEDDED_MODEL_DIR),
                        help="HF model dir, .gguf file, hub name or native export dir (default: the embedded model)")
    parser.add_argument("--mmlu-dir", default=str(EMBEDDED_DATA_DIR / "mmlu"),
                        help="MMLU: original CSV layout (dev/, test/) or JSON dev/test files; 'none' to skip")
    parser.add_argument("--zero-shot", default=str(EMBEDDED_DATA_DIR / "zero_shot" / "test.json"),
                        help="zero-shot file: ARC JSONL (official or hub layout) or generic records; 'none' to skip")
    parser.add_argument("--subjects", nargs="+", default=None, help="MMLU subjects (default: all in --mmlu-dir)")
    parser.add_argument("--limit", type=int, default=None,
                        help="first N of each task (zero-shot file; each MMLU subject), like lm-eval's --limit")
    parser.add_argument("--zero-shot-limit", type=int, default=None, help="overrides --limit for the zero-shot file")
    parser.add_argument("--mmlu-limit-per-subject", type=int, default=None, help="overrides --limit for MMLU")
    parser.add_argument("--k-shot", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--json", default=None, help="also write the report here")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    none = lambda v: None if v is None or v.lower() == "none" else v  # noqa: E731
    started = time.perf_counter()
    report = compare(args.model, none(args.mmlu_dir), none(args.zero_shot), args.limit, args.k_shot, args.batch_size,
                     subjects=args.subjects, zero_shot_limit=args.zero_shot_limit,
                     mmlu_limit_per_subject=args.mmlu_limit_per_subject)
    run = {"model": args.model, "seconds": time.perf_counter() - started, "batch_size": args.batch_size,
           "k_shot": args.k_shot}
    print(f"\nmodel: {args.model}   ({run['seconds']:.0f} s)")
    print(f"{'task':<14} {'n':>6} {'metric':<9} {'ours':>8} {'lm-eval':>8}   agreement  prompts  max|dLL|")
    ok = True
    for task, r in report.items():
        for metric in ("acc", "acc_norm"):
            if f"ours_{metric}" in r:
                print(f"{task:<14} {r['n']:>6} {metric:<9} {r[f'ours_{metric}']:>8.4f} {r[f'lm_eval_{metric}']:>8.4f}"
                      f"   {r['agreement']:>9.4f}  {r['prompts_identical']:>7.4f}  {r['max_abs_ll_diff']:.2e}")
        ok &= r["agreement"] == 1.0 and r["prompts_identical"] == 1.0
    print("parity: " + ("every prompt and prediction agrees" if ok else "PROMPTS OR PREDICTIONS DIFFER"))
    if args.json:
        Path(args.json).write_text(json.dumps({**report, "_run": run}, indent=2))
        print(f"report: {args.json}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
