"""What every part of the accuracy benchmark shares: the methods, run keys and formats, learning rates,
and the machine a run ran on."""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository


METHODS = ("qlora", "qblora", "qalora", "qablora")
DENSE_MERGE = ("qlora", "qblora")  # trained on NF4, deployed by re-quantizing the merged weight
LABEL = {"qlora": "QLoRA", "qblora": "Q-BLoRA", "qalora": "QA-LoRA", "qablora": "QA-BLoRA"}
REFERENCE = "reference"  # the unmodified model (dense) and its RTN quantizations: no training, no seed
BENCH_METRICS = ("arc_acc", "arc_acc_norm", "mmlu_acc")


MATRIX_ISA = ("amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx512f", "avx2")  # what CPU kernels dispatch on


@functools.lru_cache(maxsize=1)
def machine() -> dict:
    """The machine a run's times and last-digit rounding belong to: CPU model, cores, the matrix
    ISA extensions its kernels may use (AMX / AVX512-BF16 change both speed and rounding), and
    the torch / bitsandbytes versions."""
    import importlib.metadata as metadata
    import platform

    name, flags = platform.processor() or platform.machine(), set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            field, _, value = line.partition(":")
            if field.strip() == "model name":
                name = value.strip()
            elif field.strip() == "flags":
                flags = set(value.split())
                break
    versions = {}
    for package in ("torch", "bitsandbytes"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    return {"cpu": name, "cores": os.cpu_count(), "isa": [f for f in MATRIX_ISA if f in flags], **versions}


def machine_label(row: dict) -> str:
    """One line naming a row's machine; older rows did not record it."""
    m = row.get("machine")
    if not m:
        return "not recorded"
    isa = "/".join(m["isa"]) or "no AVX2"
    return f"{m['cpu']}, {m['cores']} cores, {isa}, torch {m.get('torch', '?')}, bitsandbytes {m.get('bitsandbytes', '?')}"


def run_key(method: str, seed: int | None, bits: int | None, group_size: int | None, qat: bool = False) -> str:
    if method == REFERENCE:
        return f"{REFERENCE}|{'dense' if bits is None else f'int{bits}_g{group_size}'}"
    base = "nf4" if bits is None else f"int{bits}_g{group_size}"
    return f"{method}{'+qat' if qat else ''}|{base}|seed{seed}"


def config_of(key: str) -> str:
    """A run key without its seed: one row of the tables (reference rows have no seed)."""
    return key if key.startswith(REFERENCE + "|") else key.rsplit("|", 1)[0]


def run_of(key: str, row: dict) -> str:
    """The key of the training run (or reference evaluation) a row came from; several rows share one.

    Rows record it as ``run``; older rows did not: a ``+ptq`` row comes from its method's NF4 run.
    """
    if "run" in row:
        return row["run"]
    method = key.split("|")[0]
    if method.endswith("+ptq"):  # the row's own "method" is the trained one
        return run_key(method.split("+")[0], row["seed"], None, None)
    return key


def format_name(base: str) -> str:
    """``int3_g32`` -> ``INT3 g32``."""
    return base.replace("int", "INT").replace("_g", " g")


def format_order(base: str) -> tuple[int, int]:
    """Sort key of ``int<b>_g<g>`` formats: widest first, then smaller groups."""
    return -int(base[3]), int(base.split("_g")[1])


def method_name(method: str) -> str:
    """``qlora+ptq`` -> ``QLoRA + RTN``, ``qblora+qat`` -> ``Q-BLoRA + QAT + RTN``, ``qlora+libgptq`` ->
    ``QLoRA + GPTQ (llm-compressor)``."""
    family, _, variant = method.partition("+")
    return LABEL[family] + {"ptq": " + RTN", "qat": " + QAT + RTN", "libgptq": " + GPTQ (llm-compressor)"}.get(variant, "")


def scored_part(config: str) -> str:
    """Which part of a ``method|base`` config's rows its scores are read from: the trained model
    for NF4 + adapter and the dense reference, else the deployed low-bit model."""
    return "trained" if config.endswith(("|nf4", "|dense")) else "low_bit"


def learning_rate(settings: dict, method: str) -> float:
    """A method's LR: ``--method-lr METHOD=LR`` if given, else ``--lr`` (LoRA family) or ``--qa-lr`` (QA-*).

    QAT and ``+ptq`` rows train with their method's LR. ``settings``: the options (or a results
    file's settings, where ``method_lr`` is absent when it was not given).
    """
    family = method.split("+")[0]
    default = settings["lr"] if family in DENSE_MERGE else settings["qa_lr"]
    return (settings.get("method_lr") or {}).get(family, default)


def _order(config: str):
    method, base = config.split("|")
    bits = int(base[3]) if base.startswith("int") else 16
    family = method.split("+")[0]
    return (-bits, base, -1 if family == REFERENCE else METHODS.index(family), method)
