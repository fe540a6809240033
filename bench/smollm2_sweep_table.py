"""Print the issue-13 LR sweep rows so far (bench/results/accuracy_smollm2_val_lr*.json) and write them into README.md:  python bench/smollm2_sweep_table.py"""
import json, glob
from pathlib import Path
LABEL = {"qlora": "QLoRA", "qblora": "Q-BLoRA", "qalora": "QA-LoRA", "qablora": "QA-BLoRA"}
rows = []
for f in sorted(glob.glob("bench/results/accuracy_smollm2_val_lr*.json")):
    d = json.load(open(f)); st = d["settings"]
    for k, r in d["runs"].items():
        m = r["method"]
        if "|nf4|" in k:  # trained row, paired with its +ptq row
            continue
        lr = st.get("lr") if m in ("qlora", "qblora") else st.get("qa_lr")
        trained = r["trained"]["loss"] if m in ("qlora", "qblora") else None
        rows.append(f"| {LABEL[m]} @ {lr:g} | {'%.4f' % trained if trained else '= deployed'} | {r['low_bit']['loss']:.4f} | {round(r['train_seconds']/60)} |")
table = "| method @ LR | val loss, trained (NF4 + adapter) | val loss, deployed INT3 g32 | train min (shared CPU) |\n|---|---|---|---|\n" + "\n".join(rows)
print(table)
p = Path("README.md"); s = p.read_text()
start = s.index("<!-- sweep:start -->\n") + len("<!-- sweep:start -->\n")
end = s.index("\n<!-- sweep:end -->", start)
new = ("The paper's method comparison on this model is issue 13's grid (`bash bench/smollm2_grid.sh sweep | lrs | step1 ...`;\n"
       "`bench/accuracy.py` docstring and `docs/benchmarks.md` give the commands). Its first stage, the learning-rate\n"
       "sweep on the **validation** split (INT3 g32, 1 seed, 200 steps, batch 4, chat Alpaca), has these runs so far;\n"
       "the test-split grid has not started, so no claim is read from them:\n\n" + table + "\n\n"
       "Compare the trained and deployed columns: what round-to-nearest re-quantization to INT3 g32 costs\n"
       "QLoRA / Q-BLoRA, next to the loss QA-* deploy exactly. One seed at one LR pair per method: no claim\n"
       "is read before the test-split grid.")
s = s[:start] + new + s[end:]
p.write_text(s)
