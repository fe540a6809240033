"""Training-step time and peak memory of each adapter strategy, relative to LoRA.

    python bench/step_cost.py                       # embedded model, CPU or GPU
    python bench/step_cost.py --model meta-llama/Llama-2-7b-hf --batch-size 4 --seq-len 512

Each strategy runs in its own subprocess (so peak memory is its own), on the same base
model, batch and budget rank, with the same optimizer (AdamW). Step time is the median over
``--steps`` timed steps after ``--warmup`` untimed ones; the cases run in ``--repeats``
interleaved rounds and each case reports its fastest round (robust to background load). Peak memory is CUDA's max allocated
bytes on a GPU; on CPU it is the process's peak resident set size (ru_maxrss) minus the
resident size once the model is loaded - the memory the training step itself adds.
Prints a table and writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name -> (quantization backend, adapter strategy, the strategy it is compared with)
CASES = {
    "qlora": ("NF4", "LoRA", "qlora"),
    "qblora": ("NF4", "QBLoRA", "qlora"),
    "lora_int4": ("GroupwiseInt", "LoRA", "lora_int4"),
    "qalora": ("GroupwiseInt", "QALoRA", "lora_int4"),
    "qablora": ("GroupwiseInt", "QABLoRA", "qalora"),
}


def _rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_case(args: argparse.Namespace) -> dict:
    import torch

    from qblora_pl import adapters, quantization
    from qblora_pl.module import QuantizedCausalLM

    backend_name, strategy_name, _ = CASES[args.case]
    backend = getattr(quantization, backend_name)(**({"bits": args.bits, "group_size": args.group_size} if backend_name == "GroupwiseInt" else {}))
    rank_kw = {"budget_rank": args.rank} if strategy_name == "QABLoRA" else {"r": args.rank}
    strategy = getattr(adapters, strategy_name)(dropout=0.0, **rank_kw)
    torch.manual_seed(0)
    module = QuantizedCausalLM(model_name_or_path=args.model, quantization=backend, adapter=strategy)
    module.configure_model()
    model = module.model
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (args.batch_size, args.seq_len), device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss_loaded = _rss_bytes()
    times = []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _rss_bytes() - rss_loaded
    return {
        "case": args.case,
        "trainable_params": sum(p.numel() for p in params),
        "step_time_s": statistics.median(times),
        "peak_memory_bytes": peak,
        "memory_kind": "cuda_max_allocated" if device.type == "cuda" else "cpu_rss_growth_during_steps",
        "tokens_per_s": args.batch_size * args.seq_len / statistics.median(times),
        "device": str(device),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF model dir or hub name (default: embedded model)")
    parser.add_argument("--rank", type=int, default=8, help="budget rank shared by every strategy")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds over all cases; the fastest round of each case is reported")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--out", default="bench/results/step_cost.json")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process
    args = parser.parse_args()
    if args.model is None:
        from qblora_pl.paths import EMBEDDED_MODEL_DIR

        args.model = str(EMBEDDED_MODEL_DIR)
    if args.case:
        print(json.dumps(run_case(args)))
        return

    results: dict[str, dict] = {}
    for round_index in range(args.repeats):  # interleaved, so background load hits every case alike
        for case in args.cases:
            cmd = [sys.executable, __file__, "--case", case, "--model", args.model]
            for key in ("rank", "bits", "group_size", "batch_size", "seq_len", "steps", "warmup"):
                cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if out.returncode != 0:
                raise SystemExit(f"case {case} failed:\n{out.stderr[-3000:]}")
            run = json.loads(out.stdout.strip().splitlines()[-1])
            run["rounds_ms"] = results.get(case, {}).get("rounds_ms", []) + [run["step_time_s"] * 1000]
            if case not in results or run["step_time_s"] < results[case]["step_time_s"]:
                results[case] = run
            results[case]["rounds_ms"] = run["rounds_ms"]
            print(f"  round {round_index + 1}/{args.repeats} {case}: {run['step_time_s'] * 1000:.1f} ms/step", file=sys.stderr)

    print(f"\nmodel={args.model} rank={args.rank} INT{args.bits} g{args.group_size} batch={args.batch_size}x{args.seq_len} device={results[args.cases[0]]['device']}")
    print(f"{'case':<10} {'params':>9} {'ms/step':>9} {'tok/s':>9} {'peak MiB':>9} {'vs':>10} {'time x':>7} {'mem x':>7}")
    for case, r in results.items():
        ref = results.get(CASES[case][2])
        t_ratio = r["step_time_s"] / ref["step_time_s"] if ref else float("nan")
        m_ratio = r["peak_memory_bytes"] / max(ref["peak_memory_bytes"], 1) if ref else float("nan")
        r["reference"], r["time_ratio"], r["memory_ratio"] = CASES[case][2], t_ratio, m_ratio
        print(
            f"{case:<10} {r['trainable_params']:>9,} {r['step_time_s'] * 1000:>9.1f} {r['tokens_per_s']:>9.0f} "
            f"{r['peak_memory_bytes'] / 2**20:>9.1f} {CASES[case][2]:>10} {t_ratio:>7.3f} {m_ratio:>7.3f}"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
