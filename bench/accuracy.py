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

Every finished run is appended to ``--out`` immediately (JSON), and runs already there are
skipped, so an interrupted sweep resumes where it stopped. ``--report-only`` prints the
table and plot from the JSON without training. Each method's learning rate is fixed up
front (``--lr`` for the LoRA family, ``--qa-lr`` for QA-*: their mean pooling over a
g-wide group shrinks the update by 1/g, see README), never chosen on the test split.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS = ("qlora", "qblora", "qalora", "qablora")
DENSE_MERGE = ("qlora", "qblora")  # trained on NF4, deployed by re-quantizing the merged weight
LABEL = {"qlora": "QLoRA", "qblora": "Q-BLoRA", "qalora": "QA-LoRA", "qablora": "QA-BLoRA"}


def run_key(method: str, seed: int, bits: int | None, group_size: int | None, qat: bool = False) -> str:
    base = "nf4" if bits is None else f"int{bits}_g{group_size}"
    return f"{method}{'+qat' if qat else ''}|{base}|seed{seed}"


def build(method: str, rank: int, bits: int | None, group_size: int | None):
    """(quantization backend, adapter strategy) of a method at one budget rank, dropout 0."""
    from qblora_pl.adapters import LoRA, QABLoRA, QALoRA, QBLoRA
    from qblora_pl.quantization import NF4, GroupwiseInt

    if method == "qlora":
        return NF4(), LoRA(r=rank, dropout=0.0)
    if method == "qblora":
        return NF4(), QBLoRA(r=rank, dropout=0.0)
    base = GroupwiseInt(bits=bits, group_size=group_size)
    if method == "qalora":
        return base, QALoRA(r=rank, dropout=0.0)
    if method == "qablora":
        return base, QABLoRA(budget_rank=rank, dropout=0.0)
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


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


def train_one(args, method: str, seed: int, bits: int | None, group_size: int | None,
              qat_bits: int | None = None, qat_group_size: int | None = None):
    """Fine-tune one method with one seed; returns (module, datamodule, seconds)."""
    import lightning.pytorch as pl

    from qblora_pl.data.instruction import InstructionDataModule
    from qblora_pl.module import QuantizedCausalLM

    pl.seed_everything(seed, verbose=False)
    quantization, adapter = build(method, args.rank, bits, group_size)
    lr = args.lr if method in DENSE_MERGE else args.qa_lr
    module = QuantizedCausalLM(args.model, quantization=quantization, adapter=adapter, learning_rate=lr, warmup_steps=args.warmup)
    data = InstructionDataModule(
        args.data, tokenizer_name_or_path=args.model, batch_size=args.batch_size, eval_batch_size=args.eval_batch_size,
        max_source_length=args.max_source_length, max_target_length=args.max_target_length,
        split_seed=0, shuffle_seed=seed,  # a fixed split; the seed sets the init and the data order
        val_fraction=args.holdout_fraction, test_fraction=args.holdout_fraction,
        drop_empty=True,  # Alpaca has records with an empty output; dropped after the split, so it is unchanged
    )
    callbacks = []
    if qat_bits is not None:
        from callbacks.qat_schedule import QATSchedule

        callbacks.append(QATSchedule(start_step=args.qat_start, ramp_steps=args.qat_ramp, bits=qat_bits, group_size=qat_group_size))
    trainer = pl.Trainer(
        accelerator="auto", devices=1, max_steps=args.steps, logger=False, enable_checkpointing=False,
        limit_val_batches=0, enable_model_summary=False, enable_progress_bar=args.progress,
        gradient_clip_val=0.3, callbacks=callbacks, deterministic=False,
    )
    started = time.perf_counter()
    trainer.fit(module, datamodule=data)
    for layer in module.adapted_layers().values():
        layer.fake_quant = None  # evaluate the model itself; QAT only shaped its training
    return module, data, time.perf_counter() - started


def eval_batches(data, device, limit: int | None, split: str = "test") -> list[dict[str, torch.Tensor]]:
    data.setup(split if split == "test" else "validate")
    batches = []
    for i, batch in enumerate(data.test_dataloader() if split == "test" else data.val_dataloader()):
        if limit is not None and i >= limit:
            break
        batches.append({k: v.to(device) for k, v in batch.items()})
    return batches


def run_method(args, method: str, seed: int, bits: int | None, group_size: int | None, qat: bool = False) -> dict[str, dict]:
    """Train once and return every row this run yields (QA-*: one; QLoRA/Q-BLoRA: trained + PTQ).

    ``qat``: train QLoRA / Q-BLoRA with the QATSchedule callback fake-quantizing the merged
    weight to INT-``bits`` group ``group_size``, then re-quantize to exactly that grid.
    """
    from qblora_pl.merging import merge_adapters, requantize_merged, unmerge_adapters

    if qat:
        module, data, seconds = train_one(args, method, seed, None, None, qat_bits=bits, qat_group_size=group_size)
        model, batches = module.model, eval_batches(data, module.device, args.test_batches, args.eval_split)
        trained = score(model, batches)
        merge_adapters(model)
        requantize_merged(model, bits=bits, group_size=group_size)
        row = {"method": method + "+qat", "seed": seed, "base": "nf4", "bits": bits, "group_size": group_size,
               "trainable_params": sum(p.numel() for p in module.parameters() if p.requires_grad),
               "train_seconds": seconds, "qat_start": args.qat_start, "qat_ramp": args.qat_ramp,
               "trained": trained, "low_bit": score(model, batches)}
        unmerge_adapters(model)
        return {run_key(method, seed, bits, group_size, qat=True): row}
    module, data, seconds = train_one(args, method, seed, bits, group_size)
    model, batches = module.model, eval_batches(data, module.device, args.test_batches, args.eval_split)
    params = sum(p.numel() for p in module.parameters() if p.requires_grad)
    trained = score(model, batches)
    how = merge_adapters(model)
    merged = score(model, batches)
    common = {"method": method, "seed": seed, "trainable_params": params, "train_seconds": seconds}
    rows = {}
    if method in DENSE_MERGE:
        rows[run_key(method, seed, None, None)] = {**common, "base": "nf4", "trained": trained, "merged": merged, "low_bit": None}
        for ptq_bits in args.bits:
            for g in args.group_sizes:
                unmerge_adapters(model)
                merge_adapters(model)
                requantize_merged(model, bits=ptq_bits, group_size=g)
                rows[run_key(method + "+ptq", seed, ptq_bits, g)] = {
                    **common, "base": "nf4", "bits": ptq_bits, "group_size": g, "trained": trained, "low_bit": score(model, batches),
                }
    else:
        assert set(how.values()) == {"offsets"}, how
        rows[run_key(method, seed, bits, group_size)] = {
            **common, "base": f"int{bits}_g{group_size}", "bits": bits, "group_size": group_size,
            "trained": trained, "low_bit": merged,
        }
    unmerge_adapters(model)
    return rows


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


def summarize(results: dict[str, dict], metric: str) -> dict[str, dict[str, tuple[float, float, int]]]:
    """{config: {"trained" | "low_bit": (mean, std, n)}} over seeds."""
    groups: dict[str, dict[str, list[float]]] = {}
    for key, row in results.items():
        config = key.rsplit("|", 1)[0]
        for part in ("trained", "low_bit"):
            if row.get(part) is not None:
                groups.setdefault(config, {}).setdefault(part, []).append(row[part][metric])
    return {c: {p: (*mean_std(v), len(v)) for p, v in parts.items()} for c, parts in groups.items()}


def print_table(results: dict[str, dict], metrics: list[str], split: str = "test") -> None:
    params = {key.rsplit("|", 1)[0]: row["trainable_params"] for key, row in results.items()}
    for metric in metrics:
        table = summarize(results, metric)
        print(f"\n{metric} on the held-out {split} split (mean ± std over seeds; n = seeds)")
        print(f"{'method':<14} {'base / low-bit':<14} {'trainable':>10} {'trained model':>26} {'deployed low-bit model':>26}")
        for config in sorted(table, key=_order):
            method, base = config.split("|")
            parts = table[config]
            fmt = lambda p: f"{parts[p][0]:.4f} ± {parts[p][1]:.4f} (n={parts[p][2]})" if p in parts else "-"
            print(f"{method:<14} {base:<14} {params[config]:>10,} {fmt('trained'):>26} {fmt('low_bit'):>26}")


def markdown_table(results: dict[str, dict], metric: str) -> str:
    """The table as Markdown (for README.md): one row per method and deployed format."""
    params = {key.rsplit("|", 1)[0]: row["trainable_params"] for key, row in results.items()}
    table = summarize(results, metric)
    lines = [f"| method | deployed as | trainable params | trained model {metric} | deployed low-bit model {metric} | seeds |",
             "|---|---|---|---|---|---|"]
    for config in sorted(table, key=_order):
        method, base = config.split("|")
        parts = table[config]
        name = LABEL[method.split("+")[0]] + {"ptq": " + RTN", "qat": " + QAT + RTN"}.get(method.partition("+")[2], "")
        deployed = "NF4 + adapter (unmerged)" if base == "nf4" else base.replace("int", "INT").replace("_g", " g")
        cell = lambda p: f"{parts[p][0]:.4f} ± {parts[p][1]:.4f}" if p in parts else "—"
        lines.append(f"| {name} | {deployed} | {params[config]:,} | {cell('trained')} | {cell('low_bit')} | {parts['trained'][2]} |")
    return "\n".join(lines)


def pivot_markdown(results: dict[str, dict], metric: str) -> str:
    """Deployed low-bit models side by side: one row per format, one column per method."""
    table = summarize(results, metric)
    columns = [m for m in ("qlora+ptq", "qlora+qat", "qblora+ptq", "qblora+qat", "qalora", "qablora")
               if any(c.startswith(m + "|") for c in table)]
    header = {"qlora+ptq": "QLoRA + RTN", "qlora+qat": "QLoRA + QAT + RTN", "qblora+ptq": "Q-BLoRA + RTN",
              "qblora+qat": "Q-BLoRA + QAT + RTN", "qalora": "QA-LoRA", "qablora": "QA-BLoRA"}
    formats = sorted({c.split("|")[1] for c in table if c.split("|")[1] != "nf4"},
                     key=lambda b: (-int(b[3]), int(b.split("_g")[1])))
    lines = ["| deployed as | " + " | ".join(header[c] for c in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for fmt in formats:
        cells = []
        for column in columns:
            cell = table.get(f"{column}|{fmt}", {}).get("low_bit")
            cells.append(f"{cell[0]:.3f} ± {cell[1]:.3f}" if cell else "—")
        lines.append(f"| {fmt.replace('int', 'INT').replace('_g', ' g')} | " + " | ".join(cells) + " |")
    unmerged = [f"{LABEL[m]} {table[f'{m}|nf4']['trained'][0]:.3f} ± {table[f'{m}|nf4']['trained'][1]:.3f}"
                for m in ("qlora", "qblora") if f"{m}|nf4" in table]
    if unmerged:
        lines.append(f"\nUnmerged NF4 + adapter (not a low-bit deployment): {', '.join(unmerged)}.")
    return "\n".join(lines)


def _order(config: str):
    method, base = config.split("|")
    bits = int(base[3]) if base.startswith("int") else 16
    return (-bits, base, METHODS.index(method.split("+")[0]), method)


def plot(results: dict[str, dict], metric: str, path: Path, title: str) -> None:
    """Deployed low-bit model's metric per bit width: QLoRA+PTQ, Q-BLoRA+PTQ, QA-LoRA, QA-BLoRA."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = summarize(results, metric)
    group_sizes = sorted({int(c.split("_g")[1]) for c in table if "_g" in c})
    fig, axes = plt.subplots(1, max(1, len(group_sizes)), figsize=(5.5 * max(1, len(group_sizes)), 4), squeeze=False)
    series = [("qlora+ptq", "QLoRA + RTN"), ("qlora+qat", "QLoRA + QAT + RTN"), ("qblora+ptq", "Q-BLoRA + RTN"),
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
                stds.append(cell[1] if cell else 0.0)
            xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(bits))]
            ax.bar(xs, means, width, yerr=stds, capsize=3, label=label)
        for method, style in (("qlora", "--"), ("qblora", ":")):
            cell = table.get(f"{method}|nf4", {}).get("trained")
            if cell:
                ax.axhline(cell[0], linestyle=style, color="gray", label=f"{LABEL[method]} (NF4, unmerged)")
        ax.set_xticks(range(len(bits)), [f"INT{b}" for b in bits])
        ax.set_title(f"group size {g}")
        ax.set_ylabel(f"test {metric} of the low-bit model")
        if metric == "loss":
            finite = [v[p][0] for v in table.values() for p in v if math.isfinite(v[p][0])]
            if finite:
                ax.set_ylim(min(finite) * 0.95, max(finite) * 1.03)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    import logging

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
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-3, help="QLoRA / Q-BLoRA (configs/qlora.yaml, qblora.yaml)")
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
    args = parser.parse_args(argv)
    if args.model:  # a .gguf file: its converted HF directory (qblora_pl.sources)
        from qblora_pl.sources import pretrained_name_or_path

        args.model = pretrained_name_or_path(args.model)
    if not args.progress:  # one line per run instead of Lightning's and the adapter table's output
        for name in ("lightning.pytorch", "lightning.fabric", "lightning_utilities"):
            logging.getLogger(name).setLevel(logging.WARNING)
    out = Path(args.out or ROOT / "bench" / "results" / f"accuracy_{args.tag}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    stored = json.loads(out.read_text()) if out.exists() else {"runs": {}}
    results: dict[str, dict] = stored["runs"]
    run_selection = ("report_only", "progress", "out", "seeds", "methods", "bits", "group_sizes", "qat_bits", "qat_only",
                     "qat_start", "qat_ramp", "include", "markdown")  # QAT runs record their schedule in their own rows
    settings = {k: v for k, v in vars(args).items() if k not in run_selection}
    settings["seed_sets"] = "adapter init, dropout and training order (split fixed)"
    if args.eval_split == "test":
        del settings["eval_split"]  # results stored before the option existed are test-split results
    if results and stored.get("settings") != settings and not args.report_only:
        raise SystemExit(f"{out} holds runs made with other settings:\n  {stored.get('settings')}\n  now: {settings}\n"
                         "pass another --out (or --tag) or delete the file")

    runs = [] if args.report_only else planned_runs(args)
    todo = [r for r in runs if run_key(*r) not in results]
    print(f"{len(runs) - len(todo)} of {len(runs)} runs already in {out}; {len(todo)} to go")
    for i, (method, seed, bits, g, qat) in enumerate(todo, 1):
        started = time.perf_counter()
        rows = run_method(args, method, seed, bits, g, qat)
        results.update(rows)
        out.write_text(json.dumps({"settings": settings, "runs": results}, indent=1))  # nothing lost on a crash
        main_row = rows[run_key(method, seed, bits, g, qat)]
        shown = main_row["low_bit"] or main_row["merged"]
        print(f"[{i}/{len(todo)}] {run_key(method, seed, bits, g, qat)}: trained loss {main_row['trained']['loss']:.4f}, "
              f"deployed loss {shown['loss']:.4f}, exact match {shown['exact_match']:.3f} "
              f"({time.perf_counter() - started:.0f}s)", flush=True)

    for extra in args.include:
        other = json.loads(Path(extra).read_text())
        if other.get("settings") != settings:
            raise SystemExit(f"{extra} was made with other settings:\n  {other.get('settings')}\n  here: {settings}")
        results = {**results, **other["runs"]}
    metrics = ["loss"] + ([] if args.no_exact_match else ["exact_match"])
    print(f"\n{args.tag}: {args.steps} steps, batch {args.batch_size}, budget rank {args.rank}, "
          f"lr {args.lr} (QLoRA, Q-BLoRA) / {args.qa_lr} (QA-*), data {args.data}")
    print_table(results, metrics, args.eval_split)
    if args.markdown:
        for metric in metrics:
            print(f"\n{markdown_table(results, metric)}\n\n{pivot_markdown(results, metric)}")
    for metric in metrics:
        png = out.with_name(f"{out.stem}_{metric}.png")
        plot(results, metric, png, f"{args.tag}: deployed low-bit model, test {metric} (mean ± std over seeds)")
        print(f"wrote {png}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
