"""Where a step's time goes, ours against HF PEFT's: both models in one process, steps interleaved.

    OMP_NUM_THREADS=1 python bench/peft_step_profile.py --rounds 8
    OMP_NUM_THREADS=1 python bench/peft_step_profile.py --ours qablora --model SmolLM2.gguf --batch-size 4

Builds one of our cases of ``bench/step_cost.py`` (``--ours``, default ``qlora``: the same NF4 base;
``qalora`` / ``qablora`` run on the INT4 g32 base) and its ``peft_qlora`` case (same rank budget,
alpha, target modules, batch, AdamW), alternates single training steps between them
(so both see the same background load), prints the process CPU time per step, then a
``torch.profiler`` table of each (self CPU time and allocated memory per op).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))


def main() -> None:
    import step_cost

    from qblora_pl import adapters, quantization
    from qblora_pl.module import QuantizedCausalLM
    from qblora_pl.paths import EMBEDDED_MODEL_DIR

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(EMBEDDED_MODEL_DIR))
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ours", default="qlora", choices=[c for c, v in step_cost.CASES.items() if v[0] in ("NF4", "GroupwiseInt")])
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--rows", type=int, default=16, help="profiler table rows")
    parser.add_argument("--compute-dtype", default="auto", help="both models' compute dtype (auto: float32 on CPU)")
    args = parser.parse_args()
    if args.model:  # a .gguf file: its converted HF directory (qblora_pl.sources)
        from qblora_pl.sources import pretrained_name_or_path

        args.model = pretrained_name_or_path(args.model)
    torch.set_num_threads(args.threads)

    ns = argparse.Namespace(model=args.model, rank=args.rank, peft_kbit_prep=False, compute_dtype=args.compute_dtype)
    torch.manual_seed(0)
    backend_name, strategy_name, _ = step_cost.CASES[args.ours]
    backend = (quantization.GroupwiseInt(bits=args.bits, group_size=args.group_size, compute_dtype=args.compute_dtype)
               if backend_name == "GroupwiseInt" else quantization.NF4(compute_dtype=args.compute_dtype))
    rank_kw = {"budget_rank": args.rank} if strategy_name == "QABLoRA" else {"r": args.rank}
    ours = QuantizedCausalLM(args.model, quantization=backend, adapter=getattr(adapters, strategy_name)(dropout=0.0, **rank_kw))
    ours.configure_model()
    models = {args.ours: ours.model, "peft_qlora": step_cost.build_peft_model(ns)}
    ids = torch.randint(3, models[args.ours].config.vocab_size, (args.batch_size, args.seq_len))
    optimizers = {
        name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4) for name, m in models.items()
    }

    def step(name: str) -> None:
        loss = models[name](input_ids=ids, labels=ids).loss
        loss.backward()
        optimizers[name].step()
        optimizers[name].zero_grad(set_to_none=True)

    for name in models:  # warm-up
        step(name)
        step(name)
    cpu: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.rounds):
        for name in models:
            start = time.process_time()
            step(name)
            cpu[name].append(time.process_time() - start)
    print(f"batch {args.batch_size}x{args.seq_len}, rank {args.rank}, {args.threads} thread(s), {args.rounds} interleaved steps each")
    for name, times in cpu.items():
        print(f"{name:<11} CPU ms/step: min {1000 * min(times):.1f}  median {1000 * statistics.median(times):.1f}")
    paired = statistics.median(a / b for a, b in zip(cpu[args.ours], cpu["peft_qlora"]))
    print(f"{args.ours} / peft_qlora, median of same-round ratios: {paired:.3f}")

    from torch.profiler import ProfilerActivity, profile

    for name in models:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            for _ in range(args.profile_steps):
                step(name)
        print(f"\n===== {name}: {args.profile_steps} steps")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=36))


if __name__ == "__main__":
    main()
