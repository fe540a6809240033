"""The method registry: each method's quantization backend and adapter strategy, built from its config.

``configs/<method>.yaml`` (``qlora``, ``qblora``, ``qalora``, ``qablora``) names both under ``model:``
as ``quantization`` and ``adapter`` (``class_path`` + ``init_args``), the same entries ``main.py fit
--config`` instantiates. :func:`from_config` builds them with some ``init_args`` overridden;
:func:`build` overrides only what a benchmark varies (rank, alpha, dropout 0, the INT-b base's width,
group and init, QA-*'s learned scales), so a benchmark's methods are the configs' methods.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from bench.accuracy_lib.common import METHODS, ROOT

CONFIGS = {method: ROOT / "configs" / f"{method}.yaml" for method in METHODS}


def method_config(config: str | Path) -> dict[str, Any]:
    """The ``model:`` section of a method's config: a method name (:data:`CONFIGS`) or a config file."""
    import yaml

    path = CONFIGS.get(config, config) if isinstance(config, str) else config
    return yaml.safe_load(Path(path).read_text())["model"]


def load_class(class_path: str) -> type:
    """``qblora_pl.adapters.LoRA`` -> the class."""
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def instantiate(spec: dict[str, Any], overrides: dict[str, Any] | None = None):
    """``class_path(**init_args)`` of one config entry, ``overrides`` replacing or adding init args."""
    return load_class(spec["class_path"])(**{**(spec.get("init_args") or {}), **(overrides or {})})


def from_config(config: str | Path, quantization: dict[str, Any] | None = None,
                adapter: dict[str, Any] | None = None):
    """(quantization backend, adapter strategy) of a config's ``model.quantization`` and ``model.adapter``,
    with the init args in ``quantization`` / ``adapter`` overridden."""
    model = method_config(config)
    return instantiate(model["quantization"], quantization), instantiate(model["adapter"], adapter)


def build(method: str, rank: int, bits: int | None, group_size: int | None, alpha: float | None = None,
          base: dict | None = None, scale_rank: int = 0):
    """(quantization backend, adapter strategy) of a method at one budget rank, dropout 0; ``alpha``
    None keeps the config's (16: scaling ``s = 16 / rank``); ``base``: the INT-b base's
    ``init`` / calibration arguments (:func:`base_args`); ``scale_rank``: QA-* learned group scales.

    From ``configs/<method>.yaml``: the rank goes to the adapter's ``budget_rank`` where it has one
    (QA-BLoRA), else to ``r``; a ``GroupwiseInt`` base (QA-*) takes ``bits``, ``group_size`` and
    ``base``, and its adapter ``scale_rank``; the NF4 base (QLoRA / Q-BLoRA) is the config's as it is.
    """
    from qblora_pl.quantization import GroupwiseInt

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    model = method_config(method)
    adapter_args = model["adapter"].get("init_args") or {}
    adapter = {"budget_rank" if "budget_rank" in adapter_args else "r": rank, "dropout": 0.0}
    if alpha is not None:
        adapter["alpha"] = alpha
    quantization = None
    if issubclass(load_class(model["quantization"]["class_path"]), GroupwiseInt):
        quantization = {"bits": bits, "group_size": group_size, **(base or {})}
        adapter["scale_rank"] = scale_rank
    return instantiate(model["quantization"], quantization), instantiate(model["adapter"], adapter)


def base_args(args) -> dict:
    """``--base-init`` and its calibration as ``GroupwiseInt`` arguments (QA-* bases and the references)."""
    return {"init": args.base_init, "calibration_records": args.calibration_records,
            "calibration_seq_len": args.calibration_seq_len}
