"""Calibrated INT-b bases before any training: held-out loss, calibration time and peak memory.

    MODEL=$(python scripts/fetch_smollm2.py --quiet)
    OMP_NUM_THREADS=2 python bench/calibrated_base.py --model $MODEL --data ../shared/data/alpaca_5000.json \\
        --bits 3 2 --inits rtn mse gptq
    # the same held-out loss for any dense HF folder (e.g. llm-compressor's GPTQ, dequantized):
    python bench/calibrated_base.py --model $MODEL --data ../shared/data/alpaca_5000.json --dense /tmp/lib/dequantized

Each case (``GroupwiseInt(bits, group_size, init=...)``, built exactly as ``main.py fit`` builds it:
calibration on the run's own training split, rendered with the chat template) runs in its own
process with an empty base cache, so its wall time and peak RSS are the quantization's own.
The held-out loss is the mean response-token loss on the first ``--eval-records`` validation
records of the data (``configs/smollm2.yaml``'s data settings: chat template, 128 + 128 tokens).
``--dense DIR`` adds rows for dense HF folders (the float model, or another library's quantized
weights dequantized) scored the same way. ``--calibration-out FILE`` writes the calibration token
sequences (JSON ``{"sequences": [...]}``) for ``scripts/library_gptq.py``, so both GPTQs see the
same tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def datamodule(args):
    from qblora_pl.data.datamodule import InstructionDataModule
    from qblora_pl.sources import pretrained_name_or_path

    dm = InstructionDataModule(data_path=args.data, tokenizer_name_or_path=pretrained_name_or_path(args.model),
                               prompt_template=args.template, max_source_length=128, max_target_length=128,
                               eval_batch_size=args.eval_batch_size, drop_empty=True, group_by_length=False)
    dm.setup("fit")
    return dm


def held_out_loss(model, dm, records: int) -> float:
    """Mean loss over the response tokens of the first ``records`` validation examples
    (``bench/accuracy.py``'s token-weighted ``score``)."""
    from bench.accuracy_lib.evaluation import score

    batches, seen = [], 0
    for batch in dm.val_dataloader():
        batches.append({k: v[: records - seen] for k, v in batch.items()})
        seen += len(batches[-1]["input_ids"])
        if seen >= records:
            break
    return score(model, batches)["loss"]


def run_case(args) -> dict:
    """One base in this process: build it as a fit would, score it, report time and peak RSS."""
    import torch

    from qblora_pl.quantization.backends import GroupwiseInt, NoQuantization
    from qblora_pl.sources import pretrained_name_or_path

    dm = datamodule(args)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.perf_counter()
    if args.case == "dense":
        model = NoQuantization(compute_dtype="float32").load(args.case_model or pretrained_name_or_path(args.model))
        label = f"dense {args.case_model or 'source'}"
    else:
        bits, init = args.case.split(":")
        backend = GroupwiseInt(bits=int(bits), group_size=args.group_size, init=init,
                               calibration_records=args.calibration_records,
                               calibration_seq_len=args.calibration_seq_len, compute_dtype="float32")
        model = backend.load(pretrained_name_or_path(args.model), calibration=dm.calibration_set)
        label = f"INT{bits} g{args.group_size} {init}"
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    loss = held_out_loss(model, dm, args.eval_records)
    return {"case": args.case, "label": label, "held_out_loss": loss, "quantize_seconds": seconds,
            "peak_rss_mib": peak, "rss_before_quantize_mib": rss_before, "threads": torch.get_num_threads(),
            "calibration_records": args.calibration_records, "calibration_seq_len": args.calibration_seq_len}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="HF folder or .gguf of the float source model")
    parser.add_argument("--data", required=True, help="the run's data (alpaca_5000.json)")
    parser.add_argument("--template", default="chat")
    parser.add_argument("--bits", type=int, nargs="*", default=[3, 2])
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--inits", nargs="*", default=["rtn", "mse", "gptq"])
    parser.add_argument("--calibration-records", type=int, default=128)
    parser.add_argument("--calibration-seq-len", type=int, default=512)
    parser.add_argument("--eval-records", type=int, default=120)
    parser.add_argument("--eval-batch-size", type=int, default=8)
    parser.add_argument("--dense", nargs="*", default=[], help="dense HF folders to score the same way ('source': the model)")
    parser.add_argument("--calibration-out", default=None, help="write the calibration token ids here and stop")
    parser.add_argument("--out", default="bench/results/calibrated_base.json")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--case-model", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.calibration_out:
        dm = datamodule(args)
        calibration = dm.calibration_set(args.calibration_records, args.calibration_seq_len)
        Path(args.calibration_out).write_text(json.dumps({"sequences": [s.tolist() for s in calibration.sequences],
                                                          "source": calibration.describe()}))
        print(f"wrote {calibration.describe()} to {args.calibration_out}")
        return
    if args.case is not None:
        print("CASE_RESULT " + json.dumps(run_case(args)), flush=True)
        return

    cases = [(f"{b}:{i}", None) for b in args.bits for i in args.inits]
    cases += [("dense", None if d == "source" else d) for d in args.dense]
    rows = []
    for case, case_model in cases:
        with tempfile.TemporaryDirectory(prefix="qblora_base_cache_") as cache:  # every case quantizes from scratch
            command = [sys.executable, __file__, "--case", case, *sys.argv[1:]]
            if case_model:
                command += ["--case-model", case_model]
            env = {**os.environ, "QBLORA_PL_CACHE": cache}
            done = subprocess.run(command, env=env, capture_output=True, text=True)
        line = next((l for l in done.stdout.splitlines() if l.startswith("CASE_RESULT ")), None)
        if done.returncode != 0 or line is None:
            print(done.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"case {case} failed (exit {done.returncode})")
        row = json.loads(line[len("CASE_RESULT "):])
        rows.append(row)
        print(f"{row['label']:<40} held-out loss {row['held_out_loss']:.3f}   quantize {row['quantize_seconds']:6.1f} s   "
              f"peak RSS {row['peak_rss_mib']:7.0f} MiB", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k not in ("case", "case_model")},
                                          "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
