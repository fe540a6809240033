"""Merge the adapters, write every requested export format, verify them, and report.

Three entry points, from the most to the least general:

* :func:`export_merged` - any Hugging Face causal LM carrying :class:`AdaptedLinear` layers;
* :func:`export_module` - a configured :class:`~qblora_pl.module.QuantizedCausalLM` (what the
  :class:`callbacks.merge_export.MergeExport` callback calls at the end of ``fit``);
* :func:`export_from_checkpoint` - an adapter checkpoint written by the Lightning trainer,
  with or without the module it came from (it can rebuild the module from the checkpoint).

The model is merged (:func:`qblora_pl.merging.merge_adapters`) for the duration of the writes
and always unmerged afterwards - also when a merge or a write fails - so training can go on.

An export appears whole or not at all: every format, the verification and the report are made in
a hidden staging directory next to ``output_dir``, which replaces ``output_dir`` only when all of
them succeeded (:func:`staged_export`). A failure leaves the previous export, if any, as it was.
An export belongs to one run: ``export_report.json`` records its ``run`` (an id, the run's
directory, the checkpoint), and an export of another run is never replaced unless
``overwrite=True`` (:func:`check_export_destination`). A directory that is not an export is
never replaced. Verification fails - and nothing is written - when a model's logits are not
finite (:class:`ExportVerificationError`).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qblora_pl.export.atomic import atomic_directory, atomic_file
from qblora_pl.export.gguf_writer import GGUFFallback, write_gguf
from qblora_pl.export.compressed_tensors_writer import CT_CLIENT, load_compressed_tensors, write_compressed_tensors
from qblora_pl.export.hf_dense import write_hf_dense
from qblora_pl.export.mlx_loader import MLX_CLIENT, load_mlx
from qblora_pl.export.mlx_writer import write_mlx
from qblora_pl.export.native import load_native, write_native
from qblora_pl.export.preflight import check_export_requirements, check_writable_destination
from qblora_pl.export.snapshot import dtype_from_name, snapshot_merged_model
from qblora_pl.export.verify import (
    compare_logits,
    fixed_token_batch,
    load_gguf,
    load_hf_dense,
    logits_and_perplexity,
    validation_batch,
)
from qblora_pl.merging import merge_adapters, unmerge_adapters
from qblora_pl.paths import portable_model_reference, resolve_data_reference, resolve_model_reference
from qblora_pl.sources import looks_like_local_path, pretrained_name_or_path

EXPORT_FORMATS = ("native", "gguf", "hf")
# Written only when named (formats: [..., mlx]): verifying mlx needs mlx-lm (pip install -e ".[mlx]"),
# compressed-tensors (vLLM / SGLang) needs compressed-tensors (pip install -e ".[vllm]").
ON_REQUEST_FORMATS = ("mlx", "compressed-tensors")
MLX_DIR = "mlx"
CT_DIR = "compressed-tensors"
NATIVE_DIR, GGUF_FILE, HF_DIR, REPORT_FILE = "native", "model.gguf", "hf", "export_report.json"


def export_merged(
    model: nn.Module,
    output_dir: str | Path,
    tokenizer_source: str | Path,
    *,
    formats: Sequence[str] = EXPORT_FORMATS,
    verify: bool = True,
    batch: dict[str, torch.Tensor] | None = None,
    batch_source: str = "given",
    native_bits: int = 4,
    native_group_size: int = 32,
    gguf_fallback: GGUFFallback = "f16",
    gguf_dense_type: str = "auto",
    dense_dtype: str = "float16",
    round_zero_points: bool = False,
    method: dict[str, Any] | None = None,
    run: dict[str, Any] | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Merge ``model``'s adapters, write ``formats`` under ``output_dir`` and verify them.

    Layout: ``native/`` (:mod:`qblora_pl.export.native`), ``model.gguf``
    (:mod:`qblora_pl.export.gguf_writer`), ``hf/`` (:mod:`qblora_pl.export.hf_dense`) and
    ``export_report.json``, all staged and swapped in together (:func:`staged_export`). A
    non-finite merged weight raises FloatingPointError naming the layer, non-finite logits
    :class:`ExportVerificationError`; either way nothing is written. ``run`` identifies the run
    the export belongs to (``{"id": ...}`` plus anything worth recording); an existing export of
    another run raises :class:`ExportDestinationError` unless ``overwrite``; a format whose packages do
    not import, :class:`~qblora_pl.export.preflight.MissingExportDependency`, and an ``output_dir``
    that cannot be written, :class:`~qblora_pl.export.preflight.ExportDestinationNotWritable`, both
    before the merge. Returns the report.
    """
    formats = check_formats(formats)
    check_export_requirements(formats, verify)
    dense = dtype_from_name(dense_dtype)
    output_dir = Path(output_dir)
    check_export_destination(output_dir, run, overwrite)
    check_writable_destination(output_dir, "export output_dir")
    with staged_export(output_dir) as stage:
        report = _export_into(
            model, stage, tokenizer_source, formats=formats, verify=verify, batch=batch, batch_source=batch_source,
            native_bits=native_bits, native_group_size=native_group_size, gguf_fallback=gguf_fallback,
            gguf_dense_type=gguf_dense_type, dense=dense, round_zero_points=round_zero_points, method=method,
            run=run, log=log,
        )
        report = _relocate(report, str(stage), str(output_dir))
        with atomic_file(stage / REPORT_FILE) as tmp:
            tmp.write_text(json.dumps(report, indent=2, default=str))
    report["report_path"] = str(output_dir / REPORT_FILE)
    log(f"export: {', '.join(formats)} complete in {output_dir}")
    return report


def _export_into(model, output_dir: Path, tokenizer_source, *, formats, verify, batch, batch_source, native_bits,
                 native_group_size, gguf_fallback, gguf_dense_type, dense, round_zero_points, method, run,
                 log) -> dict[str, Any]:
    """Write and verify every format under ``output_dir`` (the staging directory); return the report."""
    was_training = model.training
    model.eval()
    report: dict[str, Any] = {"method": method or {}, "run": run or {}, "formats": {}}
    started = time.perf_counter()
    try:
        trained_integer_zero_points = trained_with_integer_zero_points(model)  # read before the merge
        merge_how = merge_adapters(model, dense_dtype=torch.float32)
        snapshot = snapshot_merged_model(model, merge_how)
        vocab_size = snapshot.config.vocab_size
        if verify:
            if batch is None:
                batch, batch_source = fixed_token_batch(vocab_size), "fixed_tokens"
            reference, reference_ppl = logits_and_perplexity(model, batch)
            require_finite_logits(reference, "the in-memory merged model")
        writers = {
            "native": lambda: write_native(
                snapshot, output_dir / NATIVE_DIR, tokenizer_source,
                bits=native_bits, group_size=native_group_size, method=method,
            ),
            "gguf": lambda: write_gguf(
                snapshot, output_dir / GGUF_FILE, tokenizer_source,
                fallback=gguf_fallback, dense_type=gguf_dense_type,
                name=str((method or {}).get("adapter", {}).get("class", "qblora-export")),
            ),
            "hf": lambda: write_hf_dense(snapshot, output_dir / HF_DIR, tokenizer_source, dense),
            "mlx": lambda: write_mlx(snapshot, output_dir / MLX_DIR, tokenizer_source),
            "compressed-tensors": lambda: write_compressed_tensors(
                snapshot, output_dir / CT_DIR, tokenizer_source,
                # dense merges (LoRA / Q-BLoRA) are re-quantized like the native export's, by RTN
                fallback="requantize", bits=native_bits, group_size=native_group_size,
                round_zero_points=round_zero_points or trained_integer_zero_points,
                rounding_reason="trained with QATSchedule zero_point: integer" if trained_integer_zero_points else None,
            ),
        }
        for fmt in formats:
            report["formats"][fmt] = writers[fmt]()
            log(f"export: wrote {fmt} -> {report['formats'][fmt]['path']}")
        report["merge"] = {"layers": len(merge_how), "how": sorted(set(merge_how.values()))}
    finally:
        unmerge_adapters(model)
        model.train(was_training)

    if verify:
        unmerged, _ = logits_and_perplexity(model, batch)
        report["validation"] = {
            "batch_source": batch_source,
            "batch_shape": list(batch["input_ids"].shape),
            "reference": "in-memory merged model",
            "reference_ppl": reference_ppl,
            "merged_vs_unmerged": compare_logits(reference, unmerged, batch),
        }
        require_finite_logits(unmerged, "the unmerged (trained) model")
        loaders = {
            "native": lambda: (load_native(output_dir / NATIVE_DIR), "qblora_pl.export.load_native"),
            "gguf": lambda: load_gguf(output_dir / GGUF_FILE),
            "hf": lambda: (load_hf_dense(output_dir / HF_DIR), "transformers AutoModelForCausalLM (float32 compute)"),
            "mlx": lambda: (load_mlx(output_dir / MLX_DIR), MLX_CLIENT),
            "compressed-tensors": lambda: (load_compressed_tensors(output_dir / CT_DIR), CT_CLIENT),
        }
        for fmt in formats:
            loaded, client = loaders[fmt]()
            logits, ppl = logits_and_perplexity(loaded, batch)
            require_finite_logits(logits, f"the {fmt} export as loaded by {client}")
            result = {"client": client, "ppl": ppl, **compare_logits(reference, logits, batch)}
            report["formats"][fmt]["verification"] = result
            log(
                f"export verify {fmt}: max |logit diff| {result['max_abs_logit_diff']:.3g}, argmax agreement "
                f"{result['argmax_agreement']:.3f}, ppl {ppl:.4f} (in-memory {reference_ppl:.4f}) [{client}]"
            )
            del loaded
    report["seconds"] = round(time.perf_counter() - started, 2)
    return report


def trained_with_integer_zero_points(model: nn.Module) -> bool:
    """Whether every QA-* layer trains (at full strength) with its merged offsets rounded to integer zero
    points (``QATSchedule(zero_point: integer)``): then the rounded model is the trained one."""
    from qblora_pl.adapters.base import AdaptedLinear
    from qblora_pl.qat import MergedOffsetFakeQuant

    layers = [m for m in model.modules() if isinstance(m, AdaptedLinear) and m.merges_into_offsets]
    return bool(layers) and all(
        isinstance(m.fake_quant, MergedOffsetFakeQuant) and m.fake_quant.zero_point == "integer"
        and m.fake_quant.strength == 1.0 for m in layers
    )


class ExportVerificationError(RuntimeError):
    """A model taking part in the export produced non-finite logits: nothing was written."""


class ExportDestinationError(FileExistsError):
    """``output_dir`` holds something an export must not replace (another run's export, other files)."""


def require_finite_logits(logits: torch.Tensor, what: str) -> None:
    """Raise :class:`ExportVerificationError` when ``logits`` hold NaN or inf (a broken model)."""
    finite = torch.isfinite(logits)
    if bool(finite.all()):
        return
    raise ExportVerificationError(
        f"{what} produced {int((~finite).sum())} non-finite logits of {logits.numel()} on the verification batch "
        "(NaN or inf: diverged adapters, an overflowing scale or a broken file); export aborted, nothing was "
        "written and any previous export is unchanged"
    )


def read_export_report(output_dir: str | Path) -> dict[str, Any] | None:
    """The ``export_report.json`` of an existing export in ``output_dir``, or None."""
    path = Path(output_dir) / REPORT_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def check_export_destination(output_dir: str | Path, run: dict[str, Any] | None, overwrite: bool = False) -> None:
    """Refuse to replace anything but an (empty dir or) export of the same run, unless ``overwrite``.

    Never replaces a non-empty directory that is not an export (no ``export_report.json``):
    ``output_dir: .`` must not delete a working tree. Call it before training so a run does not
    learn at its end that its export has nowhere to go.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ExportDestinationError(f"export output_dir {str(output_dir)!r} is a file, not a directory")
    if not output_dir.is_dir() or not any(output_dir.iterdir()):
        return
    existing = read_export_report(output_dir)
    if existing is None:
        raise ExportDestinationError(
            f"export output_dir {str(output_dir)!r} is a non-empty directory without {REPORT_FILE}: it is not an "
            "export, and an export replaces its whole directory. Name an empty or new directory"
        )
    theirs = (existing.get("run") or {}).get("id")
    ours = (run or {}).get("id")
    if overwrite or (ours is not None and theirs == ours):
        return
    raise ExportDestinationError(
        f"export output_dir {str(output_dir)!r} holds the export of another run ({_describe_run(existing.get('run'))}); "
        "refusing to replace it. Name another directory, remove that one, or pass overwrite=True "
        "(MergeExport init_args.overwrite: true / main.py export --overwrite)"
    )


def _describe_run(run: dict[str, Any] | None) -> str:
    if not run:
        return "no run recorded"
    parts = [f"{k}={run[k]}" for k in ("id", "log_dir", "checkpoint", "global_step") if run.get(k) is not None]
    return ", ".join(parts) or "no run recorded"


@contextlib.contextmanager
def staged_export(output_dir: Path):
    """A staging directory that replaces ``output_dir`` as a whole when the block succeeds."""
    with atomic_directory(output_dir) as stage:
        yield stage


def _relocate(value: Any, old: str, new: str) -> Any:
    """``value`` with every string path under ``old`` (the staging dir) moved to ``new``."""
    if isinstance(value, dict):
        return {k: _relocate(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [_relocate(v, old, new) for v in value]
    if isinstance(value, str) and value.startswith(old):
        return new + value[len(old):]
    return value


def export_module(module, output_dir: str | Path, *, trainer: Any = None, **kwargs: Any) -> dict[str, Any]:
    """Export a configured :class:`~qblora_pl.module.QuantizedCausalLM` (adapters loaded).

    The validation batch is the first batch of ``trainer``'s val dataloader when there is
    one, else a fixed token batch. ``kwargs`` go to :func:`export_merged`.
    """
    if module.model is None:
        module.configure_model()
    method = {
        "adapter": {"class": type(module.adapter).__name__, **module.adapter.hparams()},
        "quantization": module.quantization.describe(),
        "target_modules": list(module.target_modules),
        "model_name_or_path": module.model_name_or_path,
    }
    # A .gguf source's tokenizer files live in its converted directory (qblora_pl.sources).
    tokenizer_source = pretrained_name_or_path(module.model_name_or_path)
    if kwargs.get("verify", True) and "batch" not in kwargs:
        kwargs["batch"], kwargs["batch_source"] = validation_batch(
            trainer, module.model.config.vocab_size, tokenizer_source
        )
    kwargs.setdefault("method", method)
    return export_merged(module.model, output_dir, tokenizer_source, **kwargs)


def export_from_checkpoint(
    module,
    ckpt_path: str | Path,
    output_dir: str | Path = "exports",
    formats: Sequence[str] = EXPORT_FORMATS,
    model_name_or_path: str | None = None,
    data_path: str | None = None,
    verify_records: int = 8,
    **kwargs: Any,
) -> dict[str, Any]:
    """Load an adapter checkpoint into ``module`` (or a module rebuilt from it) and export.

    Verification runs on the first ``verify_records`` held-out (validation) records of the data
    the checkpoint was trained on (``data_path`` if it moved), else on fixed sample texts. The
    export records the checkpoint as its run: re-exporting the same checkpoint may replace its
    export; another checkpoint's export is refused unless ``overwrite=True``.

    ``model_name_or_path`` replaces the base model location the checkpoint recorded (the same
    base elsewhere: its config sizes are checked against the checkpoint's).

    ``module`` is a :class:`~qblora_pl.module.QuantizedCausalLM` configured like the training
    run, or None to rebuild it from the checkpoint's recorded model path, quantization backend,
    adapter strategy and target modules. The checkpoint's adapter spec is checked against the
    module (a mismatch raises ``AdapterCheckpointMismatch``). ``kwargs`` go to
    :func:`export_module` / :func:`export_merged`.
    """
    from qblora_pl.checkpoints import (
        AdapterCheckpointMismatch,
        NonFiniteAdapterError,
        check_adapter_spec,
        non_finite_entries,
        read_checkpoint,
    )

    formats = check_formats(formats)
    check_export_requirements(formats, kwargs.get("verify", True))  # before the model loads
    check_writable_destination(output_dir, "export output_dir")
    checkpoint = read_checkpoint(ckpt_path)
    kwargs.setdefault("run", checkpoint_run(ckpt_path, checkpoint))
    bad = non_finite_entries(checkpoint["state_dict"])
    if bad:
        raise NonFiniteAdapterError(f"{ckpt_path}: the adapters hold non-finite values ({', '.join(bad)}); "
                                    "refusing to export them. Use a checkpoint written before the run diverged")
    if module is None:
        module = module_from_checkpoint(checkpoint, model_name_or_path)
    if module.calibration_source is None:
        module.calibration_source = checkpoint_calibration_source(checkpoint, data_path, model_name_or_path)
    module.configure_model()
    if "adapter_spec" not in checkpoint:
        raise AdapterCheckpointMismatch(f"{ckpt_path} has no adapter_spec: it was not written by qblora_pl")
    check_adapter_spec(
        checkpoint["adapter_spec"], module.adapter_spec(), set(checkpoint["state_dict"]), module.trainable_names()
    )
    result = module.load_state_dict(checkpoint["state_dict"], strict=False)
    if result.unexpected_keys:
        raise RuntimeError(f"{ckpt_path}: unexpected keys {result.unexpected_keys[:5]}")
    if kwargs.get("verify", True) and "batch" not in kwargs:
        held_out = held_out_batch(checkpoint, data_path, verify_records, log=kwargs.get("log", print),
                                  model_name_or_path=module.model_name_or_path)
        if held_out is not None:
            kwargs["batch"], kwargs["batch_source"] = held_out
    return export_module(module, output_dir, formats=formats, **kwargs)


def checkpoint_run(ckpt_path: str | Path, checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The run an export of ``ckpt_path`` belongs to: the checkpoint file and its step."""
    path = Path(ckpt_path).expanduser().resolve()
    step = checkpoint.get("global_step")
    return {"id": f"checkpoint:{path}@step{step}", "checkpoint": str(path), "global_step": step}


def default_checkpoint_export_dir(ckpt_path: str | Path) -> Path:
    """Where ``main.py export`` writes by default: ``<run>/exports_<x>`` for ``<run>/checkpoints/x.ckpt``,
    else ``<x>_export`` beside the checkpoint - the export lives with the run it came from, one
    directory per checkpoint, beside (never over) the fit's own ``<run>/exports``."""
    path = Path(ckpt_path).expanduser()
    if path.parent.name == "checkpoints":
        return path.parent.parent / f"exports_{path.stem}"
    return path.with_name(f"{path.stem}_export")


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
    strategy_module, _, strategy_name = spec["strategy"].rpartition(".")
    if not strategy_module.startswith("qblora_pl."):
        raise ValueError(f"refusing to import adapter strategy {spec['strategy']!r} from outside qblora_pl")
    strategy_cls = getattr(importlib.import_module(strategy_module), strategy_name)
    backend = backend_cls(**_accepted(backend_cls, quant))
    if hasattr(backend, "expect_calibration"):  # a calibrated base: find the one the run trained on
        backend.expect_calibration(quant.get("calibration_digest"))
    return QuantizedCausalLM(
        model_name_or_path=model_name_or_path or spec["model_name_or_path"],
        quantization=backend,
        adapter=strategy_cls(**_accepted(strategy_cls, spec["strategy_hparams"])),
        target_modules=hparams.get("target_modules", sorted({n.rsplit(".", 1)[-1] for n in spec["layers"]})),
    )


def _accepted(cls: type, kwargs: dict[str, Any]) -> dict[str, Any]:
    params = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in kwargs.items() if k in params}


def check_formats(formats: Sequence[str]) -> list[str]:
    formats = list(dict.fromkeys(formats))
    unknown = [f for f in formats if f not in EXPORT_FORMATS + ON_REQUEST_FORMATS]
    if unknown or not formats:
        raise ValueError(f"export formats {unknown or formats} are not among {list(EXPORT_FORMATS + ON_REQUEST_FORMATS)}")
    return formats
