"""Merge the adapters, write every requested export format, verify them, and report.

Three entry points, from the most to the least general:

* :func:`export_merged` - any Hugging Face causal LM carrying :class:`AdaptedLinear` layers;
* :func:`export_module` - a configured :class:`~qblora_pl.module.QuantizedCausalLM` (what the
  :class:`callbacks.merge_export.MergeExport` callback calls at the end of ``fit``);
* :func:`export_from_checkpoint` - an adapter checkpoint written by the Lightning trainer,
  with or without the module it came from (it can rebuild the module from the checkpoint).

The model is merged (:func:`qblora_pl.merging.merge_adapters`) for the duration of the writes
and always unmerged afterwards - also when a merge or a write fails - so training can go on.
"""

from __future__ import annotations

import importlib
import inspect
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qblora_pl.export.atomic import atomic_file
from qblora_pl.export.gguf_writer import GGUFFallback, write_gguf
from qblora_pl.export.hf_dense import write_hf_dense
from qblora_pl.export.native import load_native, write_native
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
from qblora_pl.sources import pretrained_name_or_path

EXPORT_FORMATS = ("native", "gguf", "hf")
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
    method: dict[str, Any] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Merge ``model``'s adapters, write ``formats`` under ``output_dir`` and verify them.

    Layout: ``native/`` (:mod:`qblora_pl.export.native`), ``model.gguf``
    (:mod:`qblora_pl.export.gguf_writer`), ``hf/`` (:mod:`qblora_pl.export.hf_dense`) and
    ``export_report.json``. Each is written atomically. A non-finite merged weight raises
    FloatingPointError naming the layer before anything is written. Returns the report.
    """
    formats = check_formats(formats)
    dense = dtype_from_name(dense_dtype)
    output_dir = Path(output_dir)
    was_training = model.training
    model.eval()
    report: dict[str, Any] = {"method": method or {}, "formats": {}}
    started = time.perf_counter()
    try:
        merge_how = merge_adapters(model, dense_dtype=torch.float32)
        snapshot = snapshot_merged_model(model, merge_how)
        vocab_size = snapshot.config.vocab_size
        if verify:
            if batch is None:
                batch, batch_source = fixed_token_batch(vocab_size), "fixed_tokens"
            reference, reference_ppl = logits_and_perplexity(model, batch)
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
        loaders = {
            "native": lambda: (load_native(output_dir / NATIVE_DIR), "qblora_pl.export.load_native"),
            "gguf": lambda: load_gguf(output_dir / GGUF_FILE),
            "hf": lambda: (load_hf_dense(output_dir / HF_DIR), "transformers AutoModelForCausalLM (float32 compute)"),
        }
        for fmt in formats:
            loaded, client = loaders[fmt]()
            logits, ppl = logits_and_perplexity(loaded, batch)
            result = {"client": client, "ppl": ppl, **compare_logits(reference, logits, batch)}
            report["formats"][fmt]["verification"] = result
            log(
                f"export verify {fmt}: max |logit diff| {result['max_abs_logit_diff']:.3g}, argmax agreement "
                f"{result['argmax_agreement']:.3f}, ppl {ppl:.4f} (in-memory {reference_ppl:.4f}) [{client}]"
            )
            del loaded
    report["seconds"] = round(time.perf_counter() - started, 2)
    with atomic_file(output_dir / REPORT_FILE) as tmp:
        tmp.write_text(json.dumps(report, indent=2, default=str))
    report["report_path"] = str(output_dir / REPORT_FILE)
    return report


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
    **kwargs: Any,
) -> dict[str, Any]:
    """Load an adapter checkpoint into ``module`` (or a module rebuilt from it) and export.

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

    checkpoint = read_checkpoint(ckpt_path)
    bad = non_finite_entries(checkpoint["state_dict"])
    if bad:
        raise NonFiniteAdapterError(f"{ckpt_path}: the adapters hold non-finite values ({', '.join(bad)}); "
                                    "refusing to export them. Use a checkpoint written before the run diverged")
    if module is None:
        module = module_from_checkpoint(checkpoint, model_name_or_path)
    module.configure_model()
    if "adapter_spec" not in checkpoint:
        raise AdapterCheckpointMismatch(f"{ckpt_path} has no adapter_spec: it was not written by qblora_pl")
    check_adapter_spec(
        checkpoint["adapter_spec"], module.adapter_spec(), set(checkpoint["state_dict"]), module.trainable_names()
    )
    result = module.load_state_dict(checkpoint["state_dict"], strict=False)
    if result.unexpected_keys:
        raise RuntimeError(f"{ckpt_path}: unexpected keys {result.unexpected_keys[:5]}")
    return export_module(module, output_dir, formats=formats, **kwargs)


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
    return QuantizedCausalLM(
        model_name_or_path=model_name_or_path or spec["model_name_or_path"],
        quantization=backend_cls(**_accepted(backend_cls, quant)),
        adapter=strategy_cls(**_accepted(strategy_cls, spec["strategy_hparams"])),
        target_modules=hparams.get("target_modules", sorted({n.rsplit(".", 1)[-1] for n in spec["layers"]})),
    )


def _accepted(cls: type, kwargs: dict[str, Any]) -> dict[str, Any]:
    params = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in kwargs.items() if k in params}


def check_formats(formats: Sequence[str]) -> list[str]:
    formats = list(dict.fromkeys(formats))
    unknown = [f for f in formats if f not in EXPORT_FORMATS]
    if unknown or not formats:
        raise ValueError(f"export formats {unknown or formats} are not among {list(EXPORT_FORMATS)}")
    return formats
