"""Merge the adapters, write every requested export format, verify them, and report.

Three entry points, from the most to the least general:

* :func:`export_merged` - any Hugging Face causal LM carrying :class:`AdaptedLinear` layers;
* :func:`export_module` - a configured :class:`~qblora_pl.module.QuantizedCausalLM` (what the
  :class:`qblora_pl.callbacks.MergeExport` callback calls at the end of ``fit``);
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
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qblora_pl.atomic import atomic_directory, atomic_file
from qblora_pl.export.formats import (
    ExportContext,
    ExportOptions,
    ExportPlan,
    check_formats,
    check_model_support,
    default_formats,
    export_format,
    registered_formats,
)
from qblora_pl.export.gguf_writer import GGUFFallback
from qblora_pl.export.preflight import check_export_requirements, check_writable_destination
from qblora_pl.dtypes import dtype_from_name
from qblora_pl.export.snapshot import snapshot_merged_model
from qblora_pl.export.verify import compare_logits, fixed_token_batch, logits_and_perplexity, validation_batch
from qblora_pl.export.checkpoint_source import (  # noqa: F401 - module_from_checkpoint is patched in tests
    checkpoint_calibration_source,
    held_out_batch,
    module_from_checkpoint,
)
from qblora_pl.merging import merge_adapters, unmerge_adapters
from qblora_pl.paths import resolve_model_reference
from qblora_pl.sources import pretrained_name_or_path

#: The formats written when none are named (qblora_pl.export.formats: native, gguf, hf).
EXPORT_FORMATS = tuple(default_formats())
#: Built-in formats written only when named (formats: [..., mlx]): their verification needs an optional
#: package (mlx-lm: pip install -e ".[mlx]"; compressed-tensors: pip install -e ".[vllm]").
ON_REQUEST_FORMATS = tuple(f for f in registered_formats() if f not in EXPORT_FORMATS)
NATIVE_DIR, GGUF_FILE, HF_DIR = (export_format(f).location for f in ("native", "gguf", "hf"))
MLX_DIR, CT_DIR = export_format("mlx").location, export_format("compressed-tensors").location
REPORT_FILE = "export_report.json"


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
    format_options: dict[str, dict[str, Any]] | None = None,
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
    dtype_from_name(dense_dtype)  # a bad name fails here, before the merge
    options = ExportOptions(native_bits=native_bits, native_group_size=native_group_size, gguf_fallback=gguf_fallback,
                            gguf_dense_type=gguf_dense_type, dense_dtype=dense_dtype,
                            round_zero_points=round_zero_points, format_options=dict(format_options or {}))
    output_dir = Path(output_dir)
    check_export_destination(output_dir, run, overwrite)
    check_writable_destination(output_dir, "export output_dir")
    with staged_export(output_dir) as stage:
        report = _export_into(model, stage, tokenizer_source, formats=formats, verify=verify, batch=batch,
                              batch_source=batch_source, options=options, method=method, run=run, log=log)
        report = _relocate(report, str(stage), str(output_dir))
        with atomic_file(stage / REPORT_FILE) as tmp:
            tmp.write_text(json.dumps(report, indent=2, default=str))
    report["report_path"] = str(output_dir / REPORT_FILE)
    log(f"export: {', '.join(formats)} complete in {output_dir}")
    return report


def _export_into(model, output_dir: Path, tokenizer_source, *, formats, verify, batch, batch_source,
                 options: ExportOptions, method, run, log) -> dict[str, Any]:
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
        context = ExportContext(snapshot=snapshot, export_dir=output_dir, tokenizer_source=tokenizer_source,
                                options=options, method=method,
                                trained_with_integer_zero_points=trained_integer_zero_points)
        for fmt in formats:
            report["formats"][fmt] = export_format(fmt).write(context)
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
        for fmt in formats:
            loaded, client = export_format(fmt).load(output_dir / export_format(fmt).location)
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


def options_from(kwargs: dict[str, Any]) -> ExportOptions:
    """The :class:`ExportOptions` that :func:`export_merged` will build from these keyword arguments."""
    names = set(ExportOptions.__dataclass_fields__)
    given = {name: value for name, value in kwargs.items() if name in names and value is not None}
    if "format_options" in given:
        given["format_options"] = dict(given["format_options"])
    return ExportOptions(**given)


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
    options = options_from(kwargs)
    check_model_support(formats, export_plan(module, options.native_bits, options.native_group_size),
                        options)  # before the model loads
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


def export_plan(module, native_bits: int = 4, native_group_size: int = 32) -> ExportPlan:
    """What an export of ``module`` (a :class:`~qblora_pl.module.QuantizedCausalLM`) will hold, from its
    configuration and its model's ``config.json`` alone: checked by every format before training."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(pretrained_name_or_path(resolve_model_reference(module.model_name_or_path)))
    except Exception:  # noqa: BLE001 - unreadable here (an offline hub name): the model load will say why
        config = None
    quantization = module.quantization
    merges = bool(getattr(module.adapter, "requires_offsets", False)) and hasattr(quantization, "group_size")
    low_bit = (quantization.bits, quantization.group_size) if merges else (native_bits, native_group_size)
    return ExportPlan(model_config=config, low_bit=low_bit, merges_into_offsets=merges)
