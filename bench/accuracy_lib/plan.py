"""Which runs an invocation asks for, and which of them the stored results already hold."""

from __future__ import annotations

from bench.accuracy_lib.common import DENSE_MERGE, REFERENCE, run_key
from bench.accuracy_lib.evaluation import benchmark_tasks


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
