"""Export the fine-tuned model, merged and low-bit, when training ends.

Add to a config::

    trainer:
      callbacks:
        - class_path: qblora_pl.callbacks.MergeExport
          init_args:
            output_dir: exports          # relative to the run's log dir: runs/<name>/version_N/exports
            formats: [native, gguf, hf]  # project INT-b checkpoint, llama.cpp GGUF, dense HF dir
            gguf_fallback: f16           # for layers with no exact GGUF type (LoRA merges, INT2/3/8)

The same export runs on a saved adapter checkpoint through
:func:`qblora_pl.export.export_from_checkpoint`. See docs/export.md for the formats, which
merges are exact (QA-LoRA / QA-BLoRA on INT4 g32k: native and GGUF Q4_1) and which are lossy
re-quantizations (LoRA / Q-BLoRA), and what the verification measures.

Each run exports into its own directory (a relative ``output_dir`` lives in the run's log dir).
A format whose packages are missing (``mlx`` without mlx-lm), a format that cannot write the model
(``gguf`` for a non-Llama architecture) or an ``output_dir`` that cannot be written stops ``fit``
before the model loads (:mod:`qblora_pl.export.preflight`). A path the user
names may hold an export of another run: that is refused when ``fit`` starts (before any
training), unless ``overwrite: true``. A resumed run keeps its run id (the callback's
checkpointed state), so it may replace its own export. Exports are staged and appear whole or
not at all (:mod:`qblora_pl.export.exporter`).
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from qblora_pl.distributed import is_sharded, unsharded_copy
from qblora_pl.export.exporter import EXPORT_FORMATS, check_export_destination, export_module, export_plan
from qblora_pl.export.formats import ExportOptions, UnsupportedExportFormat, check_formats, check_model_support
from qblora_pl.export.preflight import (
    ExportDestinationNotWritable,
    MissingExportDependency,
    check_export_requirements,
    check_writable_destination,
)


class MergeExport(pl.Callback):
    """Merge the adapters into the model at the end of ``fit`` and write it for deployment.

    Args:
        output_dir: where the exports go; a relative path is taken relative to the run's log
            directory (``trainer.log_dir``: ``runs/<name>/version_N``; ``default_root_dir``
            without a logger), so every run has its own.
        overwrite: allow replacing an export another run wrote in ``output_dir``.
        formats: any of ``native`` (the project's INT-b checkpoint, :func:`qblora_pl.export.load_native`),
            ``gguf`` (llama.cpp), ``hf`` (merged dense Hugging Face directory) and, on request,
            ``mlx`` (mlx-lm's quantized layout; verifying it needs ``mlx-lm``) and ``compressed-tensors``
            (vLLM / SGLang's ``pack-quantized`` layout; verifying it needs ``compressed-tensors``).
        verify: load every export back, run a validation batch (the datamodule's first val
            batch, else fixed tokens) and record the max logit difference from the in-memory
            merged model and both perplexities in ``export_report.json``.
        gguf_fallback: GGUF type for layers Q4_1 cannot hold exactly: ``f16`` or
            ``requantize_q4_1`` (round-to-nearest). Either is announced with a warning.
        dense_dtype: dtype of the merged Hugging Face export (``float16``, ``bfloat16``, ``float32``).
        native_bits: bits for layers the native and compressed-tensors exports must re-quantize (dense
            LoRA / Q-BLoRA merges; round-to-nearest, with integer zero points for compressed-tensors).
        native_group_size: group size for those re-quantized layers.
        round_zero_points: ``compressed-tensors`` stores integer zero points; round the merged offsets to
            them (lossy, measured by the verification) instead of refusing a model whose offsets are not
            integer multiples of its scales. Not needed after ``QATSchedule(zero_point: integer)``.
        format_options: settings of formats registered beyond the built-in ones, by format name
            (``{my-format: {level: 3}}``; docs/extending.md).
    """

    def __init__(
        self,
        output_dir: str = "exports",
        formats: list[str] = list(EXPORT_FORMATS),
        verify: bool = True,
        gguf_fallback: Literal["f16", "requantize_q4_1"] = "f16",
        dense_dtype: str = "float16",
        native_bits: int = 4,
        native_group_size: int = 32,
        overwrite: bool = False,
        round_zero_points: bool = False,
        format_options: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        super().__init__()
        self.output_dir = output_dir
        self.overwrite = overwrite
        self.run_id: str | None = None
        self.formats = check_formats(formats)
        self.verify = verify
        self.gguf_fallback = gguf_fallback
        self.dense_dtype = dense_dtype
        self.native_bits = native_bits
        self.native_group_size = native_group_size
        self.round_zero_points = round_zero_points
        self.format_options = dict(format_options or {})
        self.options = ExportOptions(native_bits=native_bits, native_group_size=native_group_size,
                                     gguf_fallback=gguf_fallback, dense_dtype=dense_dtype,
                                     round_zero_points=round_zero_points, format_options=self.format_options)
        self.report: dict[str, Any] | None = None

    def resolve_output_dir(self, trainer: pl.Trainer) -> Path:
        path = Path(self.output_dir).expanduser()
        return path if path.is_absolute() else Path(trainer.log_dir or trainer.default_root_dir) / path

    def run_record(self, trainer: pl.Trainer) -> dict[str, Any]:
        """What the export report says about the run it belongs to."""
        if self.run_id is None:
            self.run_id = uuid.uuid4().hex
        return {"id": self.run_id, "log_dir": trainer.log_dir, "global_step": trainer.global_step,
                "resumed_from": getattr(trainer, "ckpt_path", None)}

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.run_id = state_dict.get("run_id") or self.run_id

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Lightning calls the callbacks' setup before the module's setup and configure_model (which
        # loads the model): a missing package or an unwritable output_dir stops the run before
        # anything loads, not at its end. Rank 0 exports, so it checks; every rank raises its verdict
        # (one rank failing alone would leave the others waiting at the next collective).
        if stage != "fit":
            return
        output_dir = self.resolve_output_dir(trainer)  # a collective under FSDP2: every rank asks
        problem = None
        if trainer.is_global_zero:
            try:
                check_export_requirements(self.formats, self.verify)
                check_writable_destination(output_dir, "MergeExport output_dir")
                check_model_support(self.formats, export_plan(pl_module, self.native_bits, self.native_group_size),
                                    self.options)
            except (MissingExportDependency, ExportDestinationNotWritable, UnsupportedExportFormat) as err:
                problem = err
        problem = trainer.strategy.broadcast(problem)
        if problem is not None:
            raise problem

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Checkpoint state (a resumed run's id) is restored before on_fit_start. Fail now, not
        # after hours of training, when the export would have to replace another run's.
        # trainer.log_dir is a collective under FSDP2 (the strategy broadcasts it): every rank asks.
        output_dir, record = self.resolve_output_dir(trainer), self.run_record(trainer)
        if trainer.is_global_zero:
            check_export_destination(output_dir, record, self.overwrite)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step == 0:
            rank_zero_warn("MergeExport: no optimizer step was taken in this run; the export holds the base model "
                           "with its initial adapters")
        module = pl_module
        if pl_module.model is not None and is_sharded(pl_module.model):
            # FSDP: every rank gathers the adapters; rank 0 exports an unsharded twin (docs/fsdp.md).
            module = unsharded_copy(pl_module, keep=trainer.is_global_zero)
        output_dir, record = self.resolve_output_dir(trainer), self.run_record(trainer)  # collectives (log_dir)
        if not trainer.is_global_zero:
            return
        self.report = export_module(
            module,
            output_dir,
            trainer=trainer,
            formats=self.formats,
            verify=self.verify,
            gguf_fallback=self.gguf_fallback,
            dense_dtype=self.dense_dtype,
            native_bits=self.native_bits,
            native_group_size=self.native_group_size,
            round_zero_points=self.round_zero_points,
            format_options=self.format_options,
            run=record,
            overwrite=self.overwrite,
            log=rank_zero_info,
        )
        if self.verify and trainer.logger is not None:
            metrics = {}
            for fmt, result in self.report["formats"].items():
                check = result.get("verification", {})
                for key in ("max_abs_logit_diff", "argmax_agreement", "ppl"):
                    if key in check:
                        metrics[f"export/{fmt}/{key}"] = check[key]
            trainer.logger.log_metrics(metrics, step=trainer.global_step)
