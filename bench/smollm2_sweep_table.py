"""Write the SmolLM2 learning-rate sweep (bench/results/accuracy_smollm2_val_lr*.json) into docs/results/README.md.

    python bench/smollm2_sweep_table.py            # prints the table and rewrites the results file's sweep block

Rows: every method at every LR swept so far, sorted by method then LR; the lowest validation loss
of each method in bold (deployed loss; for QLoRA / Q-BLoRA both the trained NF4 + adapter loss and
the INT3 g32 RTN loss are shown, and each column's best is bold). Idempotent: the block between
``<!-- sweep:start -->`` and ``<!-- sweep:end -->`` is replaced.
"""

from __future__ import annotations

import glob
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.accuracy_lib import DENSE_MERGE, LABEL, best_lr, chosen_lrs, learning_rate, lr_sweep, method_lr_option  # noqa: E402

SWEEP_FILES = str(ROOT / "bench" / "results" / "accuracy_smollm2_val_lr*.json")
RESULTS_DOC = ROOT / "docs" / "results" / "README.md"  # the block between its sweep markers is rewritten


def sweep_rows() -> dict[str, dict[float, dict]]:
    """method -> LR -> {"trained": loss or None, "deployed": loss, "minutes": training wall clock}."""
    rows: dict[str, dict[float, dict]] = {}
    for path in sorted(glob.glob(SWEEP_FILES)):
        stored = json.loads(Path(path).read_text())
        settings = stored["settings"]
        for key, run in stored["runs"].items():
            method = run["method"]
            if "|nf4|" in key or method not in LABEL:  # the NF4 row pairs with its +ptq row
                continue
            lr = learning_rate(settings, method)
            rows.setdefault(method, {})[lr] = {
                "trained": run["trained"]["loss"] if method in DENSE_MERGE else None,
                "deployed": run["low_bit"]["loss"],
                "minutes": round(run["train_seconds"] / 60),
            }
    return rows


def table(rows: dict[str, dict[float, dict]]) -> str:
    lines = ["| method @ LR | val loss, trained (NF4 + adapter) | val loss, deployed INT3 g32 | train min (shared CPU) |",
             "|---|---|---|---|"]
    for method in [m for m in LABEL if m in rows]:
        by_lr = rows[method]
        best_deployed = min(r["deployed"] for r in by_lr.values())
        best_trained = min((r["trained"] for r in by_lr.values() if r["trained"] is not None), default=None)
        for lr in sorted(by_lr):
            r = by_lr[lr]
            trained = "= deployed" if r["trained"] is None else (
                f"**{r['trained']:.4f}**" if r["trained"] == best_trained else f"{r['trained']:.4f}")
            deployed = f"**{r['deployed']:.4f}**" if r["deployed"] == best_deployed else f"{r['deployed']:.4f}"
            lines.append(f"| {LABEL[method]} @ {lr:g} | {trained} | {deployed} | {r['minutes']} |")
    return "\n".join(lines)


def main() -> None:
    text = table(sweep_rows())
    trained = lr_sweep(sorted(glob.glob(SWEEP_FILES)))[1]["trained"]  # what --lr-report chooses by
    chosen = method_lr_option(chosen_lrs(trained))
    edges = [method for method, means in trained.items() if best_lr(means)[1]]
    print(text)
    s = RESULTS_DOC.read_text()
    start = s.index("<!-- sweep:start -->\n") + len("<!-- sweep:start -->\n")
    end = s.index("\n<!-- sweep:end -->", start)
    block = (
        "The paper's method comparison on this model is the test-split grid above (`bash bench/smollm2_grid.sh sweep | lrs | step1 ...`;\n"
        "`bench/smollm2_grid.sh` and `docs/benchmarks.md` give the commands). Its first stage, the learning-rate\n"
        "sweep on the **validation** split (INT3 g32, 1 seed, 200 steps, batch 4, chat Alpaca), gave these runs\n"
        "(`python bench/smollm2_sweep_table.py` rewrites this table; best per method and column in bold):\n\n"
        + text + "\n\n"
        "Compare the trained and deployed columns: what round-to-nearest re-quantization to INT3 g32 costs\n"
        "QLoRA / Q-BLoRA, next to the loss QA-* deploy exactly. These are validation runs for choosing\n"
        "learning rates (one seed); the paper's claims are read from the test-split grid, not from them.\n"
        "Each LR is chosen by the val loss of the model the method trains (QLoRA / Q-BLoRA: NF4 + adapter;\n"
        "why, and where the deployed RTN loss would choose otherwise: `docs/benchmarks.md` (a)). "
        "`python bench/accuracy.py --lr-report bench/results/accuracy_smollm2_val_lr*.json` "
        f"chooses `{chosen}`" + (f"; still at an end of the grid: {', '.join(edges)}" if edges else "") + "."
    )
    RESULTS_DOC.write_text(s[:start] + block + s[end:])


if __name__ == "__main__":
    main()
