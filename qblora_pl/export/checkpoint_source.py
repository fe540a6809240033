"""Rebuild what an adapter checkpoint was trained with: its module, its data and its calibration.

Used by :func:`qblora_pl.export.exporter.export_from_checkpoint` (``main.py export --ckpt_path``):
the module from the checkpoint's recorded base, quantization and adapter strategy; the held-out
records it verifies on from the run's recorded data module; the calibration records of a
calibrated base from the run's training split. Recorded paths that moved with the checkout are
re-resolved.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from qblora_pl.paths import portable_model_reference, resolve_data_reference, resolve_model_reference
from qblora_pl.sources import looks_like_local_path


def held_out_batch(checkpoint: dict[str, Any], data_path: str | None = None, records: int = 8,
                   log: Callable[[str], None] = print,
                   model_name_or_path: str | None = None) -> tuple[dict[str, torch.Tensor], str] | None:
    """The first ``records`` validation records of the data the checkpoint was trained on.

    The data module is rebuilt from the checkpoint's ``datamodule_hyper_parameters`` (Lightning
    stores them), ``data_path`` replacing the recorded path when the data moved. Returns None
    (with a log line saying why) when the checkpoint recorded no data or it cannot be read.
    Recorded paths that moved with the checkout are re-resolved; the tokenizer follows the model
    being exported (``model_name_or_path``) when the run used the model's own tokenizer, or when
    the recorded tokenizer folder is gone.
    """
    hparams = dict(checkpoint.get("datamodule_hyper_parameters") or {})
    if not hparams and data_path is None:
        log("export verify: the checkpoint records no training data; verifying on fixed sample texts")
        return None
    try:
        datamodule = checkpoint_datamodule(checkpoint, data_path, model_name_or_path, eval_batch_size=records)
        datamodule.setup("validate")
        batch = next(iter(datamodule.val_dataloader()))
    except Exception as err:  # noqa: BLE001 - moved or unreadable data: say so, verify on sample texts
        hint = "" if data_path is not None else " (pass --data_path to use the run's held-out records)"
        log(f"export verify: the run's data {_recorded_data_path(checkpoint, data_path)!r} could not be read "
            f"({type(err).__name__}: {err}); verifying on fixed sample texts{hint}")
        return None
    batch = {k: v[:records] for k, v in batch.items() if isinstance(v, torch.Tensor)}
    return batch, f"validation split of {datamodule.data_path} (first {len(batch['input_ids'])} records)"


def _recorded_data_path(checkpoint: dict[str, Any], data_path: str | None) -> str:
    if data_path is not None:
        return data_path
    return resolve_data_reference((checkpoint.get("datamodule_hyper_parameters") or {}).get("data_path", ""))


def checkpoint_datamodule(checkpoint: dict[str, Any], data_path: str | None = None,
                          model_name_or_path: str | None = None, **overrides: Any):
    """The :class:`~qblora_pl.data.datamodule.InstructionDataModule` the checkpoint was trained with (not set up).

    Rebuilt from the checkpoint's ``datamodule_hyper_parameters`` (Lightning stores them),
    ``data_path`` replacing the recorded path when the data moved; recorded paths that moved with the
    checkout are re-resolved, and the tokenizer follows ``model_name_or_path`` when the run used the
    model's own tokenizer or the recorded tokenizer folder is gone.
    """
    from qblora_pl.data.datamodule import InstructionDataModule

    hparams = {k: v for k, v in dict(checkpoint.get("datamodule_hyper_parameters") or {}).items()
               if not k.startswith("_")}
    hparams["data_path"] = _recorded_data_path(checkpoint, data_path)
    if model_name_or_path is not None:
        hparams["tokenizer_name_or_path"] = _tokenizer_for_export(
            hparams.get("tokenizer_name_or_path"), (checkpoint.get("hyper_parameters") or {}).get("model_name_or_path"),
            model_name_or_path)
    accepted = inspect.signature(InstructionDataModule.__init__).parameters
    hparams = {k: v for k, v in {**hparams, **overrides}.items() if k in accepted}
    return InstructionDataModule(**hparams)


def checkpoint_calibration_source(checkpoint: dict[str, Any], data_path: str | None = None,
                                  model_name_or_path: str | None = None):
    """``(records, seq_len) -> CalibrationSet`` from the training split the checkpoint was trained on.

    Used by a calibrated base (``GroupwiseInt(init='gptq')``) that is not in the cache; the data
    is read only when it is called.
    """
    def calibration_set(records: int, seq_len: int):
        return checkpoint_datamodule(checkpoint, data_path, model_name_or_path).calibration_set(records, seq_len)

    return calibration_set


def _tokenizer_for_export(recorded: str | None, recorded_model: str | None, model_name_or_path: str) -> str:
    """The tokenizer to verify with: the recorded one, unless it was the model's or its folder is gone."""
    if not recorded:
        return model_name_or_path
    resolved = resolve_model_reference(recorded)
    was_the_models = recorded_model is not None and portable_model_reference(resolved) == portable_model_reference(
        resolve_model_reference(recorded_model))
    if was_the_models or (looks_like_local_path(resolved) and not Path(resolved).exists()):
        return model_name_or_path
    return resolved


def module_from_checkpoint(checkpoint: dict[str, Any], model_name_or_path: str | None = None):
    """Rebuild the :class:`~qblora_pl.module.QuantizedCausalLM` an adapter checkpoint came from.

    The recorded base (``embedded:tiny-llama`` or a path / hub name) is used unless
    ``model_name_or_path`` names another location of it.
    """
    from qblora_pl.module import QuantizedCausalLM
    from qblora_pl.quantization import backends

    spec = checkpoint.get("adapter_spec")
    hparams = checkpoint.get("hyper_parameters", {})
    if spec is None:
        raise ValueError("checkpoint has no adapter_spec: it was not written by qblora_pl")
    quant = dict(spec["quantization"])
    backend_cls = getattr(backends, quant.pop("backend"))
    strategy_cls = _adapter_strategy_class(spec["strategy"])
    backend = backend_cls(**_accepted(backend_cls, quant))
    if hasattr(backend, "expect_calibration"):  # a calibrated base: find the one the run trained on
        backend.expect_calibration(quant.get("calibration_digest"))
    return QuantizedCausalLM(
        model_name_or_path=model_name_or_path or spec["model_name_or_path"],
        quantization=backend,
        adapter=strategy_cls(**_accepted(strategy_cls, spec["strategy_hparams"])),
        target_modules=hparams.get("target_modules", sorted({n.rsplit(".", 1)[-1] for n in spec["layers"]})),
    )


def _adapter_strategy_class(path: str) -> type:
    """The :class:`~qblora_pl.adapters.base.AdapterStrategy` subclass a checkpoint names (a method of this
    package or one of the user's, importable here); anything else is refused before it is called."""
    from qblora_pl.adapters.base import AdapterStrategy

    module_name, _, class_name = str(path).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"the checkpoint's adapter strategy {path!r} cannot be imported here ({type(err).__name__}: "
                         f"{err}); install the package that defines it") from err
    if not (isinstance(cls, type) and issubclass(cls, AdapterStrategy)):
        raise ValueError(f"refusing the checkpoint's adapter strategy {path!r}: it is not an AdapterStrategy subclass")
    return cls


def _accepted(cls: type, kwargs: dict[str, Any]) -> dict[str, Any]:
    params = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in kwargs.items() if k in params}
