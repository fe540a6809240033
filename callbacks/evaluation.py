"""Benchmark evaluation in ``python main.py test``: MMLU k-shot, zero-shot MC, perplexity, exact match.

Add to a config::

    trainer:
      callbacks:
        - class_path: qblora_pl.callbacks.EvaluationSuite
          init_args:
            batch_size: 16
            tasks:
              - class_path: qblora_pl.evaluation.MMLU           # 5-shot, answer-letter logits
                init_args: {k_shot: 5}
              - class_path: qblora_pl.evaluation.ZeroShotMultipleChoice   # acc / acc_norm
              - instruction_ppl                                  # registered names work too
              - exact_match

Every task's records are read and validated in ``setup`` - before Lightning builds the model -
so a bad row fails in seconds with the file and row in the message. The tasks then run at the
end of the test epoch on the model as tested (``--ckpt_path`` picks the adapter; a native
low-bit export passed as ``--model.model_name_or_path`` is evaluated as it is). See
docs/evaluation.md.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info

from qblora_pl.evaluation.base import EvaluationTask
from qblora_pl.evaluation.suite import check_tasks, format_results_table, resolve_tasks, run_tasks, write_report
from qblora_pl.quantization.int_layer import dequantized_weight_cache


class EvaluationSuite(pl.Callback):
    """Run evaluation tasks at the end of ``test``; log, print and write the results.

    Scalars ``test/<task>/<metric>`` (and ``test/<task>/examples_per_s``) go through
    ``LightningModule.log`` - TensorBoard, ``trainer.callback_metrics`` and the returned test
    metrics; a table is printed (stdout) on rank zero and the full report (metrics, example counts,
    timings, task settings, model and checkpoint) is written as JSON.

    Every rank runs every task on identical inputs (so a sharded model's collectives line up) and
    computes the same numbers; only rank zero prints and writes.

    Args:
        tasks: :class:`~qblora_pl.evaluation.EvaluationTask` objects (``class_path`` entries) or
            registered names (``mmlu``, ``zero_shot``, ``instruction_ppl``, ``exact_match``).
        batch_size: sequences per forward pass.
        max_length: longest input in tokens (default: the model's ``max_position_embeddings``).
        output_json: report file; a relative path is taken relative to ``trainer.log_dir``
            (the run's ``version_N`` directory), else ``trainer.default_root_dir``.
        progress_bar: show a tqdm bar per task.
        cache_dequantized_weights: while the tasks run, each INT-b (``GroupwiseIntLinear``) layer
            keeps its unpacked weight instead of unpacking it on every forward
            (``qblora_pl.quantization.int_layer.dequantized_weight_cache``): the same scores,
            by what unpacking costs faster (1.06x for SmolLM2 INT3 on a CPU, docs/evaluation.md),
            for one dense float32 copy of every INT-b weight in memory. Off by default (a low-bit model is low-bit to
            save that memory); for one process, not a sharded model.
    """

    def __init__(self, tasks: list[EvaluationTask | str], batch_size: int = 8, max_length: int | None = None,
                 output_json: str = "evaluation.json", progress_bar: bool = True,
                 cache_dequantized_weights: bool = False) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.tasks = resolve_tasks(tasks)
        self.batch_size = batch_size
        self.max_length = max_length
        self.output_json = output_json
        self.progress_bar = progress_bar
        self.cache_dequantized_weights = cache_dequantized_weights
        self.results: dict[str, dict[str, Any]] | None = None
        self.report_path: Path | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "test":
            counts = check_tasks(self.tasks)
            rank_zero_info("evaluation tasks checked: " + ", ".join(f"{k} ({v} examples)" for k, v in counts.items()))

    def resolve_output_path(self, trainer: pl.Trainer) -> Path:
        path = Path(self.output_json).expanduser()
        if path.is_absolute():
            return path
        return Path(trainer.log_dir or trainer.default_root_dir) / path

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        tokenizer = _tokenizer_for(trainer, pl_module)
        log = rank_zero_info if trainer.is_global_zero else None
        cache = dequantized_weight_cache(pl_module.model) if self.cache_dequantized_weights else nullcontext()
        with cache:
            self.results = run_tasks(pl_module.model, tokenizer, self.tasks, batch_size=self.batch_size,
                                     max_length=self.max_length, progress=self.progress_bar and trainer.is_global_zero,
                                     log=log)
        for name, result in self.results.items():
            for metric, value in result["metrics"].items():
                pl_module.log(f"test/{name}/{metric}", value, on_epoch=True, sync_dist=False)
            pl_module.log(f"test/{name}/examples_per_s", result["examples_per_s"], on_epoch=True, sync_dist=False)
        if trainer.is_global_zero:
            self.report_path = write_report(
                self.resolve_output_path(trainer), self.results,
                model_name_or_path=getattr(pl_module, "model_name_or_path", None),
                ckpt_path=trainer.ckpt_path, batch_size=self.batch_size,
            )
            print("\n" + format_results_table(self.results) + f"\nreport: {self.report_path}", flush=True)


def _tokenizer_for(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
    """The datamodule's tokenizer (the one training used), else the model's own."""
    datamodule = getattr(trainer, "datamodule", None)
    tokenizer = getattr(datamodule, "tokenizer", None)
    if tokenizer is not None:
        return tokenizer
    from qblora_pl.sources import load_tokenizer

    source = getattr(pl_module, "model_name_or_path", None)
    if source is None:
        raise RuntimeError("EvaluationSuite needs a tokenizer: the datamodule has none and the module has no model_name_or_path")
    tokenizer = load_tokenizer(source)  # a model directory, a .gguf file (its converted directory) or a hub name
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer
