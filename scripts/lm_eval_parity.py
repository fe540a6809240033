#!/usr/bin/env python
"""Peer check: our multiple-choice accuracies against lm-evaluation-harness on the same model and records.

Writes local lm-eval task definitions (YAML) that point at local JSON files - the zero-shot set
as an ``output_type: multiple_choice`` task with ``acc`` / ``acc_norm``, and the MMLU-format set
as one k-shot task per subject in the layout of lm-eval's own ``mmlu`` tasks (``first_n`` dev
shots, the same description, ``doc_to_text`` and letter choices) - runs them with lm-eval's
``HFLM`` on the model, runs our :class:`~qblora_pl.evaluation.ZeroShotMultipleChoice` and
:class:`~qblora_pl.evaluation.MMLU` on the same records, and prints both sides: accuracies,
per-question agreement of the predictions and the largest log-likelihood difference.

lm-eval runs with ``add_bos_token=True``: our scorer starts every text with BOS, as training
does (lm-eval's HFLM omits it by default for causal models).

Usage::

    pip install lm-eval==0.4.13
    python scripts/lm_eval_parity.py                          # the embedded model, embedded records
    python scripts/lm_eval_parity.py --model exports/<run>/native   # a merged native low-bit export
    python scripts/lm_eval_parity.py --model DIR --limit 100 --k-shot 5 --batch-size 16

Exit status 1 when a prediction differs. ``compare()`` is the importable entry point (tests).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from qblora_pl.evaluation import MMLU, LanguageModelScorer, ZeroShotMultipleChoice  # noqa: E402
from qblora_pl.evaluation.multiple_choice import LETTERS, format_subject, load_mmlu_split  # noqa: E402
from qblora_pl.paths import EMBEDDED_DATA_DIR, EMBEDDED_MODEL_DIR  # noqa: E402

ZERO_SHOT_TASK = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {test}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{query}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""

# lm_eval/tasks/mmlu/default/_default_template_yaml plus a per-subject file, pointed at local JSON.
MMLU_TASK = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {test}
    dev: {dev}
test_split: test
fewshot_split: dev
fewshot_config:
  sampler: first_n
num_fewshot: {k_shot}
description: {description}
output_type: multiple_choice
doc_to_text: "{{{{question.strip()}}}}\\nA. {{{{choices[0]}}}}\\nB. {{{{choices[1]}}}}\\nC. {{{{choices[2]}}}}\\nD. {{{{choices[3]}}}}\\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def load_model(path: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qblora_pl.export.native import is_native_export, load_native

    model = load_native(path) if is_native_export(path) else AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def _write_json(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text(json.dumps(rows))
    return str(path)


def write_tasks(workdir: Path, zero_shot: list[dict], mmlu_test: list[dict], mmlu_dev: list[dict], k_shot: int) -> dict:
    """lm-eval task YAMLs and their data under ``workdir``; returns ``{"zero_shot": name, "mmlu": {subject: name}}``."""
    tasks: dict[str, Any] = {"mmlu": {}}
    if zero_shot:
        test = _write_json(workdir / "zero_shot.json", zero_shot)
        (workdir / "parity_zero_shot.yaml").write_text(ZERO_SHOT_TASK.format(name="parity_zero_shot", test=test))
        tasks["zero_shot"] = "parity_zero_shot"
    by_subject: dict[str, dict[str, list]] = defaultdict(lambda: {"test": [], "dev": []})
    for split, records in (("test", mmlu_test), ("dev", mmlu_dev)):
        for r in records:
            by_subject[r["subject"]][split].append({"question": r["question"], "choices": r["choices"],
                                                    "answer": r["label"], "subject": r["subject"]})
    for subject, splits in sorted(by_subject.items()):
        if not splits["test"]:
            continue
        name = f"parity_mmlu_{subject}"
        description = json.dumps(f"The following are multiple choice questions (with answers) about {format_subject(subject)}.\n\n")
        (workdir / f"{name}.yaml").write_text(MMLU_TASK.format(
            name=name, test=_write_json(workdir / f"{name}_test.json", splits["test"]),
            dev=_write_json(workdir / f"{name}_dev.json", splits["dev"]), k_shot=k_shot, description=description))
        tasks["mmlu"][subject] = name
    return tasks


def run_lm_eval(model, tokenizer, workdir: Path, task_names: list[str], batch_size: int) -> dict[str, Any]:
    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, add_bos_token=True)
    return evaluator.simple_evaluate(model=lm, tasks=task_names, task_manager=TaskManager(include_path=str(workdir)),
                                     log_samples=True, bootstrap_iters=0, random_seed=0)


def _sample_lls(samples: list[dict]) -> list[list[float]]:
    """Per document (in doc_id order), lm-eval's log-likelihood of each choice."""
    ordered = sorted(samples, key=lambda s: s["doc_id"])
    return [[float(r[0]) for r in s["filtered_resps"]] for s in ordered]


def compare(model_path: str = str(EMBEDDED_MODEL_DIR), mmlu_dir: str = str(EMBEDDED_DATA_DIR / "mmlu"),
            zero_shot_path: str = str(EMBEDDED_DATA_DIR / "zero_shot" / "test.json"), limit: int | None = None,
            k_shot: int = 5, batch_size: int = 16, model=None, tokenizer=None) -> dict[str, dict[str, float]]:
    """Run both sides; returns ``{task: {ours_acc, lm_eval_acc, ..., agreement, max_abs_ll_diff, n}}``."""
    import torch

    if model is None:
        model, tokenizer = load_model(model_path)
    zs_rows = json.loads(Path(zero_shot_path).read_text())[:limit]
    mmlu_test = load_mmlu_split(mmlu_dir, "test")[:limit]
    mmlu_dev = load_mmlu_split(mmlu_dir, "dev")
    report: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        tasks = write_tasks(workdir, zs_rows, mmlu_test, mmlu_dev, k_shot)
        names = [tasks["zero_shot"], *tasks["mmlu"].values()]
        theirs = run_lm_eval(model, tokenizer, workdir, names, batch_size)
        scorer = LanguageModelScorer(model, tokenizer, batch_size=batch_size, progress=False)

        ours_zs = ZeroShotMultipleChoice(data_path=str(workdir / "zero_shot.json"))
        ours_zs.load_and_check()
        our_lls = ours_zs.choice_loglikelihoods(scorer)
        their_lls = _sample_lls(theirs["samples"][tasks["zero_shot"]])
        ours_metrics = ours_zs.evaluate(scorer)
        agree = sum(int(torch.tensor(a).argmax() == torch.tensor(b).argmax()) for a, b in zip(our_lls, their_lls))
        diff = max(abs(x - y) for a, b in zip(our_lls, their_lls) for x, y in zip(a, b))
        res = theirs["results"][tasks["zero_shot"]]
        report["zero_shot"] = {"n": len(our_lls), "ours_acc": ours_metrics["acc"], "lm_eval_acc": res["acc,none"],
                               "ours_acc_norm": ours_metrics["acc_norm"], "lm_eval_acc_norm": res["acc_norm,none"],
                               "agreement": agree / len(our_lls), "max_abs_ll_diff": diff}

        # MMLU: our per-subject records in the lm-eval data files' order (same test / dev files).
        (workdir / "mmlu").mkdir()
        test_rows = [{**r, "answer": LETTERS[r["label"]]} for r in mmlu_test]
        dev_rows = [{**r, "answer": LETTERS[r["label"]]} for r in mmlu_dev]
        _write_json(workdir / "mmlu" / "test.json", test_rows)
        _write_json(workdir / "mmlu" / "dev.json", dev_rows)
        ours_mmlu = MMLU(data_path=str(workdir / "mmlu"), k_shot=k_shot)
        ours_mmlu.load_and_check()
        scores, _ = ours_mmlu.letter_logprobs(scorer)
        labels = torch.tensor([r["label"] for r in ours_mmlu.records])
        their_by_subject = {s: _sample_lls(theirs["samples"][n]) for s, n in tasks["mmlu"].items()}
        cursor = defaultdict(int)
        agree, diff, their_hits = 0, 0.0, 0
        for row, record in zip(scores, ours_mmlu.records):
            theirs_row = their_by_subject[record["subject"]][cursor[record["subject"]]]
            cursor[record["subject"]] += 1
            agree += int(row.argmax()) == int(torch.tensor(theirs_row).argmax())
            their_hits += int(torch.tensor(theirs_row).argmax()) == record["label"]
            diff = max(diff, max(abs(float(x) - y) for x, y in zip(row, theirs_row)))
        n = len(ours_mmlu.records)
        report[f"mmlu_{k_shot}shot"] = {"n": n, "ours_acc": float((scores.argmax(-1) == labels).float().mean()),
                                        "lm_eval_acc": their_hits / n, "agreement": agree / n, "max_abs_ll_diff": diff,
                                        "scoring": ours_mmlu.scoring}
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(EMBEDDED_MODEL_DIR), help="HF model dir or a native export dir")
    parser.add_argument("--mmlu-dir", default=str(EMBEDDED_DATA_DIR / "mmlu"))
    parser.add_argument("--zero-shot", default=str(EMBEDDED_DATA_DIR / "zero_shot" / "test.json"))
    parser.add_argument("--limit", type=int, default=None, help="first N records of each set")
    parser.add_argument("--k-shot", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)
    report = compare(args.model, args.mmlu_dir, args.zero_shot, args.limit, args.k_shot, args.batch_size)
    print(f"\nmodel: {args.model}")
    print(f"{'task':<14} {'n':>4} {'metric':<9} {'ours':>8} {'lm-eval':>8}   agreement  max|dLL|")
    ok = True
    for task, r in report.items():
        for metric in ("acc", "acc_norm"):
            if f"ours_{metric}" in r:
                print(f"{task:<14} {r['n']:>4} {metric:<9} {r[f'ours_{metric}']:>8.4f} {r[f'lm_eval_{metric}']:>8.4f}"
                      f"   {r['agreement']:>9.4f}  {r['max_abs_ll_diff']:.2e}")
        ok &= r["agreement"] == 1.0
    print("parity: " + ("every prediction agrees" if ok else "PREDICTIONS DIFFER"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
