"""Training-step time and peak memory of each adapter strategy, relative to LoRA and to HF PEFT.

    python bench/step_cost.py                       # embedded model, CPU or GPU
    python bench/step_cost.py --model meta-llama/Llama-2-7b-hf --batch-size 4 --seq-len 512
    python bench/step_cost.py --cases qlora qblora --nf4-implementations bitsandbytes torchao

``--nf4-implementations bitsandbytes torchao`` adds ``qlora_torchao`` / ``qblora_torchao``: the same
cases on ``NF4(implementation="torchao")`` (torchao's NF4Tensor, the base FSDP2 can shard), each
compared with its bitsandbytes twin (``time x`` / ``mem x``) and listed side by side at the end.

Each strategy runs in its own subprocess (so peak memory is its own), on the same base
model, batch and budget rank, with the same optimizer (AdamW). The ``peft_qlora`` case is
the reference implementation of QLoRA: Hugging Face PEFT's ``LoraConfig`` / ``get_peft_model``
over ``AutoModelForCausalLM.from_pretrained(..., quantization_config=BitsAndBytesConfig(...))``
with exactly the quantization config our ``NF4`` backend uses (NF4, double quantization,
same compute dtype, uint8 storage), the same target modules, r, alpha, dropout, initialisation
(A Kaiming-uniform, B zero) and optimizer. ``peft.prepare_model_for_kbit_training`` is *not*
called by default, because our NF4 path does not do what it does (upcast every non-4-bit
parameter to fp32, turn on gradient checkpointing); ``--peft-kbit-prep`` calls it with
``use_gradient_checkpointing=False`` (on a CPU with fp32 compute it then only freezes the
base, which get_peft_model does anyway). Every case is reported as a ratio to PEFT as well. Step time is the median over
``--steps`` timed steps after ``--warmup`` untimed ones; the cases run in ``--repeats``
interleaved rounds and each case reports its fastest round (robust to background load).
On a shared CPU the process CPU time per step (``time.process_time``, median over the steps,
least over the rounds) is reported next to it: with one intra-op thread it is what the step
costs, and other processes' load moves it much less than the wall clock. Because a round runs
every case back to back, the median over rounds of (case CPU time / PEFT CPU time in the same
round) - "paired" - cancels most of the load a round saw: it is the figure to quote on a
shared machine. Peak memory is CUDA's max allocated
bytes on a GPU; on CPU it is the process's peak resident set size (ru_maxrss) minus the
resident size once the model is loaded - the memory the training step itself adds.
Prints a table and writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
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
    "peft_qlora": ("NF4", "peft.LoRA", "peft_qlora"),  # HF PEFT + bitsandbytes, the reference
    # NF4 on torchao (--nf4-implementations ... torchao), each against its bitsandbytes twin
    "qlora_torchao": ("NF4:torchao", "LoRA", "qlora"),
    "qblora_torchao": ("NF4:torchao", "QBLoRA", "qblora"),
    # what other grid recipes cost per step (bench/decision_table.py): QAT at --bits / --group-size, learned scales
    "qlora_qat": ("NF4", "LoRA", "qlora"),
    "qblora_qat": ("NF4", "QBLoRA", "qblora"),
    "qablora_scales": ("GroupwiseInt", "QABLoRA", "qablora"),
}
#: cases that change the strategy or the step beyond (backend, strategy): QATSchedule's fake quantizer at
#: full strength on every adapted layer, or QA-BLoRA's learned group scales (scale_rank 4, as in the grid)
CASE_OPTIONS = {"qlora_qat": {"qat": True}, "qblora_qat": {"qat": True}, "qablora_scales": {"scale_rank": 4}}
TORCHAO_CASES = {"qlora": "qlora_torchao", "qblora": "qblora_torchao"}
PEFT_CASE = "peft_qlora"


def _rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _proc_status_bytes(field: str) -> int | None:
    """``VmRSS`` / ``VmHWM`` of this process from /proc (Linux), in bytes; None elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _release_and_reset_peak() -> None:
    """Return freed heap to the OS and restart the peak-RSS counter (VmHWM), so the peak measured
    after this is the training step's, not the model load's (which holds float32 weights)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


class SavedActivations:
    """Bytes autograd saves for backward during a forward that are not parameters or buffers (the
    activations, and before issue 36 the INT-b layers' dense W_hat), counted once per storage."""

    def __init__(self, model) -> None:
        self.model_storages = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
        self.seen: set[int] = set()
        self.bytes = 0
        self.largest: list[tuple[int, tuple, str]] = []

    def pack(self, t):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self.model_storages and ptr not in self.seen and storage.nbytes() > 0:
            self.seen.add(ptr)
            self.bytes += storage.nbytes()
            self.largest = sorted([*self.largest, (storage.nbytes(), tuple(t.shape), str(t.dtype))], reverse=True)[:5]
        return t


def build_peft_model(args: argparse.Namespace):
    """HF PEFT LoRA over transformers + bitsandbytes NF4, configured like our ``qlora`` case."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    from qblora_pl.adapters import LoRA
    from qblora_pl.adapters.injection import LLAMA_TARGET_MODULES
    from qblora_pl.quantization import NF4
    from qblora_pl.quantization.backends import resolve_dtype

    ours = NF4(compute_dtype=getattr(args, "compute_dtype", "auto"))  # our qlora case's BitsAndBytesConfig
    dtype = resolve_dtype(ours.compute_dtype)
    from qblora_pl.sources import pretrained_name_or_path

    model = AutoModelForCausalLM.from_pretrained(  # a .gguf model: its converted HF directory
        pretrained_name_or_path(args.model), dtype=dtype, quantization_config=ours.bitsandbytes_config(), device_map=ours.device_map()
    )
    if args.peft_kbit_prep:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    lora = LoRA(r=args.rank, dropout=0.0)  # alpha: our default, so the scaling alpha / r is the same
    peft_config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=0.0,
        target_modules=list(LLAMA_TARGET_MODULES),
        bias="none",
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(0)
    model = get_peft_model(model, peft_config)
    model.train()
    return model


def run_case(args: argparse.Namespace) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import importlib

    # The case's libraries are imported before the memory baseline, so the baseline holds them.
    libraries = ("transformers", "bitsandbytes", "peft") if args.case == PEFT_CASE else ("transformers", "lightning", "qblora_pl.module")
    for name in libraries:
        importlib.import_module(name)
    _release_and_reset_peak()
    rss_baseline = _proc_status_bytes("VmRSS")
    if args.case == PEFT_CASE:
        model = build_peft_model(args)
        if args.gradient_checkpointing:
            model.config.use_cache = False
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        from qblora_pl import adapters, quantization
        from qblora_pl.module import QuantizedCausalLM

        backend_name, strategy_name, _ = CASES[args.case]
        if backend_name == "NF4:torchao":
            backend = quantization.NF4(implementation="torchao", scaler_block_size=args.scaler_block_size)
        else:
            backend = getattr(quantization, backend_name)(**({"bits": args.bits, "group_size": args.group_size} if backend_name == "GroupwiseInt" else {}))
        rank_kw = {"budget_rank": args.rank} if strategy_name == "QABLoRA" else {"r": args.rank}
        options = CASE_OPTIONS.get(args.case, {})
        if "scale_rank" in options:
            rank_kw["scale_rank"] = options["scale_rank"]
        strategy = getattr(adapters, strategy_name)(dropout=0.0, **rank_kw)
        torch.manual_seed(0)
        module = QuantizedCausalLM(model_name_or_path=args.model, quantization=backend, adapter=strategy,
                                   gradient_checkpointing=args.gradient_checkpointing)
        module.configure_model()
        model = module.model
        if options.get("qat"):  # what QATSchedule attaches once its ramp is done
            from qblora_pl.adapters.base import AdaptedLinear
            from qblora_pl.qat import MergedWeightFakeQuant

            for layer in model.modules():
                if isinstance(layer, AdaptedLinear):
                    layer.fake_quant = MergedWeightFakeQuant(bits=args.bits, group_size=args.group_size)
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (args.batch_size, args.seq_len), device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    frozen = [t for t in (*model.parameters(), *model.buffers()) if not t.requires_grad]
    base_bytes, adapter_bytes = _tensor_bytes(frozen), _tensor_bytes(params)
    saved = SavedActivations(model)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        resident = torch.cuda.memory_allocated()
    _release_and_reset_peak()
    rss_loaded = _rss_bytes()
    resident_cpu = _proc_status_bytes("VmRSS")
    times, cpu_times = [], []
    for step in range(args.warmup + args.steps):
        if args.validate_every and step % args.validate_every == 0:
            # What Lightning's validation loop does between training steps: an eval-mode no-grad
            # forward. On an AVX512-BF16 CPU it makes bitsandbytes repack the NF4 weights, after
            # which its backward loses their gradient path (qblora_pl's NF4 backend undoes that).
            model.eval()
            with torch.no_grad():
                model(input_ids=ids[:1])
            model.train()
        start, cpu_start = time.perf_counter(), time.process_time()
        hooks = torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t)
        with hooks if step == 0 else contextlib.nullcontext():  # the first (untimed) step is measured
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if step == 0:
            grad_bytes = _tensor_bytes(p.grad for p in params if p.grad is not None)
        optimizer.step()
        if step == 0:
            state_bytes = _tensor_bytes(t for st in optimizer.state.values() for t in st.values() if torch.is_tensor(t))
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _rss_bytes() - rss_loaded
    # Peak memory of model + training (from after the imports), split into: the frozen base (its
    # tensors' bytes); the adapter with its gradients and AdamW state; what autograd saved for
    # backward in one forward (the activations: non-parameter tensors); the transient (the measured
    # peak above what was resident after the load, less the gradients, optimizer state and
    # activations: a layer's dequantized weight, the logits' softmax, allocator slack); and what was
    # resident after the load besides the base and adapter tensors (the Python objects of the
    # model, libraries' lazily imported code, heap the load left behind).
    if device.type == "cuda":
        total_peak, resident_after_load = torch.cuda.max_memory_allocated(), resident
    else:
        hwm = _proc_status_bytes("VmHWM")
        total_peak = None if hwm is None or rss_baseline is None else hwm - rss_baseline
        resident_after_load = None if resident_cpu is None or rss_baseline is None else resident_cpu - rss_baseline
    split = None
    if total_peak is not None:
        split = {
            "base": base_bytes,
            "adapter_optimizer": adapter_bytes + grad_bytes + state_bytes,
            "activations": saved.bytes,
            "transient": total_peak - resident_after_load - grad_bytes - state_bytes - saved.bytes,
            "resident_other": resident_after_load - base_bytes - adapter_bytes,
        }
    return {
        "case": args.case,
        "trainable_params": sum(p.numel() for p in params),
        "step_time_s": statistics.median(times),
        "step_cpu_s": statistics.median(cpu_times),
        "peak_memory_bytes": peak,
        "memory_kind": "cuda_max_allocated" if device.type == "cuda" else "cpu_rss_growth_during_steps",
        "tokens_per_s": args.batch_size * args.seq_len / statistics.median(times),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "validate_every": args.validate_every,
        "base_linear_type": sorted({type(m).__name__ for n, m in model.named_modules() if n.endswith(".base_layer")}),
        "gradient_checkpointing": args.gradient_checkpointing,
        "total_peak_bytes": total_peak,
        "resident_after_load_bytes": resident_after_load,
        "memory_split_bytes": split,
        "largest_saved": saved.largest,
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
    parser.add_argument("--cases", nargs="+", default=[c for c in CASES if c not in TORCHAO_CASES.values() and c not in CASE_OPTIONS],
                        choices=list(CASES))
    parser.add_argument("--nf4-implementations", nargs="+", default=["bitsandbytes"], choices=["bitsandbytes", "torchao"],
                        help="NF4 bases to time the qlora / qblora cases on (torchao adds qlora_torchao / qblora_torchao)")
    parser.add_argument("--scaler-block-size", type=int, default=256, help="torchao NF4: blocks per double-quantization factor")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads per case (0: torch's default / OMP_NUM_THREADS)")
    parser.add_argument("--validate-every", type=int, default=0,
                        help="an untimed eval-mode no-grad forward before every Nth step, as a fit that validates runs (0: never)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward (every case)")
    parser.add_argument("--peft-kbit-prep", action="store_true", help="call peft.prepare_model_for_kbit_training(use_gradient_checkpointing=False) in the PEFT case")
    parser.add_argument("--out", default="bench/results/step_cost.json")
    parser.add_argument("--plot", default=None, help="PNG bar chart (default: --out with .png)")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process
    args = parser.parse_args()
    if args.model:  # a .gguf file: its converted HF directory (qblora_pl.sources)
        from qblora_pl.sources import pretrained_name_or_path

        args.model = pretrained_name_or_path(args.model)
    if args.model is None:
        from qblora_pl.paths import EMBEDDED_MODEL_DIR

        args.model = str(EMBEDDED_MODEL_DIR)
    if args.case:
        print(json.dumps(run_case(args)))
        return
    if "torchao" in args.nf4_implementations:
        args.cases += [TORCHAO_CASES[c] for c in args.cases if c in TORCHAO_CASES and TORCHAO_CASES[c] not in args.cases]
    if "bitsandbytes" not in args.nf4_implementations:
        args.cases = [c for c in args.cases if c not in TORCHAO_CASES]

    if PEFT_CASE in args.cases:
        import importlib.util

        if importlib.util.find_spec("peft") is None:
            print("peft is not installed (pip install peft): the peft_qlora case is skipped", file=sys.stderr)
            args.cases = [c for c in args.cases if c != PEFT_CASE]
    results: dict[str, dict] = {}
    for round_index in range(args.repeats):  # interleaved, so background load hits every case alike
        for case in args.cases:
            cmd = [sys.executable, __file__, "--case", case, "--model", args.model]
            for key in ("rank", "bits", "group_size", "batch_size", "seq_len", "steps", "warmup", "threads", "validate_every",
                        "scaler_block_size"):
                cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
            cmd += ["--peft-kbit-prep"] * args.peft_kbit_prep + ["--gradient-checkpointing"] * args.gradient_checkpointing
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if out.returncode != 0:
                raise SystemExit(f"case {case} failed:\n{out.stderr[-3000:]}")
            run = json.loads(out.stdout.strip().splitlines()[-1])
            run["rounds_ms"] = results.get(case, {}).get("rounds_ms", []) + [run["step_time_s"] * 1000]
            run["rounds_cpu_ms"] = results.get(case, {}).get("rounds_cpu_ms", []) + [run["step_cpu_s"] * 1000]
            if case not in results or run["step_time_s"] < results[case]["step_time_s"]:
                results[case] = run
            results[case]["rounds_ms"], results[case]["rounds_cpu_ms"] = run["rounds_ms"], run["rounds_cpu_ms"]
            results[case]["best_cpu_ms"] = min(run["rounds_cpu_ms"])
            print(
                f"  round {round_index + 1}/{args.repeats} {case}: {run['step_time_s'] * 1000:.1f} ms/step wall, "
                f"{run['step_cpu_s'] * 1000:.1f} ms CPU",
                file=sys.stderr,
            )

    peft = results.get(PEFT_CASE)
    print(f"\nmodel={args.model} rank={args.rank} INT{args.bits} g{args.group_size} batch={args.batch_size}x{args.seq_len} device={results[args.cases[0]]['device']} threads={results[args.cases[0]]['torch_threads']}")
    print(
        f"{'case':<14} {'params':>9} {'ms/step':>9} {'CPU ms':>8} {'tok/s':>9} {'peak MiB':>9} {'vs':>10} {'time x':>7} {'mem x':>7}"
        f" {'time x PEFT':>11} {'CPU x PEFT':>10} {'paired':>7} {'mem x PEFT':>10}"
    )
    for case, r in results.items():
        ref = results.get(CASES[case][2])
        t_ratio = r["step_time_s"] / ref["step_time_s"] if ref else float("nan")
        m_ratio = r["peak_memory_bytes"] / max(ref["peak_memory_bytes"], 1) if ref else float("nan")
        r["reference"], r["time_ratio"], r["memory_ratio"] = CASES[case][2], t_ratio, m_ratio
        r["time_ratio_vs_peft"] = r["step_time_s"] / peft["step_time_s"] if peft else None
        r["memory_ratio_vs_peft"] = r["peak_memory_bytes"] / max(peft["peak_memory_bytes"], 1) if peft else None
        r["cpu_time_ratio_vs_peft"] = r["best_cpu_ms"] / peft["best_cpu_ms"] if peft else None
        # Same-round pairs: each round runs every case back to back, so a ratio within a round
        # cancels most of the load that round saw; the median over rounds is the robust figure.
        r["paired_cpu_ratio_vs_peft_per_round"] = (
            [a / b for a, b in zip(r["rounds_cpu_ms"], peft["rounds_cpu_ms"])] if peft else None
        )
        r["paired_cpu_ratio_vs_peft_median"] = (
            statistics.median(r["paired_cpu_ratio_vs_peft_per_round"]) if peft else None
        )
        r["paired_wall_ratio_vs_peft_median"] = (
            statistics.median(a / b for a, b in zip(r["rounds_ms"], peft["rounds_ms"])) if peft else None
        )
        on_cpu = r["device"] == "cpu"  # on a GPU the step is not CPU-bound: pair the wall times
        r["paired_ratio_vs_peft"] = r["paired_cpu_ratio_vs_peft_median" if on_cpu else "paired_wall_ratio_vs_peft_median"]
        r["median_round_ms"] = statistics.median(r["rounds_ms"])
        fmt = lambda v: f"{v:.3f}" if v is not None else "-"  # noqa: E731
        print(
            f"{case:<14} {r['trainable_params']:>9,} {r['step_time_s'] * 1000:>9.1f} {r['best_cpu_ms']:>8.1f} {r['tokens_per_s']:>9.0f} "
            f"{r['peak_memory_bytes'] / 2**20:>9.1f} {CASES[case][2]:>10} {t_ratio:>7.3f} {m_ratio:>7.3f}"
            f" {fmt(r['time_ratio_vs_peft']):>11} {fmt(r['cpu_time_ratio_vs_peft']):>10}"
            f" {fmt(r['paired_ratio_vs_peft']):>7} {fmt(r['memory_ratio_vs_peft']):>10}"
        )
    if peft:
        print(
            "ms/step and time x: each case's fastest round (wall clock); CPU ms: its least process CPU time per "
            "step over the rounds (much less sensitive to other processes' load than wall time); paired: median over "
            "rounds of the case's CPU time (wall time on a GPU) / PEFT's in the same round; median-round wall ms/step: "
            + ", ".join(f"{c} {r['median_round_ms']:.1f}" for c, r in results.items())
        )
    _print_nf4_side_by_side(results)
    environment = _environment()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "environment": environment, "results": results}, indent=2))
    print(f"wrote {args.out}")
    plot = args.plot or str(Path(args.out).with_suffix(".png"))
    _plot(results, args, environment, plot)
    print(f"wrote {plot}")


def _print_nf4_side_by_side(results: dict) -> None:
    """Each NF4 case on bitsandbytes next to the same case on torchao's NF4Tensor."""
    pairs = [(c, t) for c, t in TORCHAO_CASES.items() if c in results and t in results]
    if not pairs:
        return
    print(f"\nNF4 base: bitsandbytes vs torchao (peak memory: {results[pairs[0][0]]['memory_kind']})")
    print(f"{'case':<8} {'bnb ms':>8} {'torchao ms':>10} {'x':>6} {'bnb CPU ms':>10} {'torchao CPU ms':>14} {'x':>6}"
          f" {'bnb MiB':>8} {'torchao MiB':>11} {'x':>6}")
    for bnb, ao in pairs:
        b, a = results[bnb], results[ao]
        print(f"{bnb:<8} {b['step_time_s'] * 1000:>8.1f} {a['step_time_s'] * 1000:>10.1f} {a['step_time_s'] / b['step_time_s']:>6.2f}"
              f" {b['best_cpu_ms']:>10.1f} {a['best_cpu_ms']:>14.1f} {a['best_cpu_ms'] / b['best_cpu_ms']:>6.2f}"
              f" {b['peak_memory_bytes'] / 2**20:>8.1f} {a['peak_memory_bytes'] / 2**20:>11.1f}"
              f" {a['peak_memory_bytes'] / max(b['peak_memory_bytes'], 1):>6.2f}")


def _environment() -> dict:
    import os
    import platform

    import torch

    from importlib.metadata import PackageNotFoundError, version

    versions = {"torch": torch.__version__}
    for package in ("transformers", "bitsandbytes", "peft", "lightning", "torchao"):
        try:  # the installed version, without importing the package (torchao's import is slow and noisy)
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return {
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "versions": versions,
    }


def _plot(results: dict, args: argparse.Namespace, environment: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(results)
    palette = {"NF4": "#1f77b4", "NF4:torchao": "#9467bd"}
    colors = ["#888888" if c == PEFT_CASE else palette.get(CASES[c][0], "#2ca02c") for c in cases]
    fig, axes = plt.subplots(1, 4, figsize=(16, 4))
    panels = (
        ("ms / step, wall (fastest round)", [results[c]["step_time_s"] * 1000 for c in cases], "time_ratio_vs_peft"),
        ("CPU ms / step (least round); label: paired x PEFT", [results[c]["best_cpu_ms"] for c in cases],
         "paired_ratio_vs_peft"),
        ("tokens / s", [results[c]["tokens_per_s"] for c in cases], None),
        ("peak memory MiB" + (" (RSS growth)" if results[cases[0]]["device"] == "cpu" else ""),
         [results[c]["peak_memory_bytes"] / 2**20 for c in cases], "memory_ratio_vs_peft"),
    )
    for ax, (title, values, ratio_key) in zip(axes, panels):
        bars = ax.bar(cases, values, color=colors)
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=35)
        if ratio_key and results[cases[0]].get(ratio_key) is not None:
            for bar, c in zip(bars, cases):
                ax.annotate(f"{results[c][ratio_key]:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=8)
    device = results[cases[0]]["device"]
    fig.suptitle(
        f"train step, batch {args.batch_size}x{args.seq_len}, rank {args.rank}, {device} "
        f"({environment['cpu_count']} cores, {results[cases[0]]['torch_threads']} thread(s)); labels: x PEFT; "
        "blue NF4 (bitsandbytes), purple NF4 (torchao), green INT4 g32, grey HF PEFT",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
