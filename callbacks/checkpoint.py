"""Lightning's ModelCheckpoint, made safe for interrupted and diverged runs.

Configs name it (``class_path: qblora_pl.callbacks.AdapterCheckpoint``) with Lightning's
``ModelCheckpoint`` arguments; it writes the same checkpoint files under the same callback state
key, and ``main.py`` refuses a plain ``ModelCheckpoint`` and adds ``AdapterCheckpoint()`` where
Lightning would add its default one. What it adds:

* **No bad adapters over good ones.** A save whose adapters are NaN / inf or come from a diverged
  run (the module refuses to write them: :class:`~qblora_pl.checkpoints.NonFiniteAdapterError`)
  is skipped with a message; ``last.ckpt`` and the top-k files keep the last good adapters.
* **Ctrl-C stops at a step boundary.** The first SIGINT during training is held until the
  current optimizer step has finished; then ``last.ckpt`` and ``step<N>-interrupted.ckpt`` are
  written at that step (a state Lightning resumes exactly: same steps, validations and
  checkpoints as an uninterrupted run) and the run stops as interrupted (exit 1). A second
  Ctrl-C stops at once, without a checkpoint (a half-finished step cannot be resumed exactly).
* **Crash checkpoints say what they are.** On another exception the adapters (if finite) are
  saved as ``step<N>-exception.ckpt`` and ``last.ckpt``, not under the metric-based file name,
  whose value would be a stale validation loss (or ``0.0000`` before the first validation).
"""

from __future__ import annotations

import math
import os
import signal
import threading
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from qblora_pl.checkpoints import NonFiniteAdapterError


class GracefulInterrupt(KeyboardInterrupt):
    """Raised at a step boundary after a Ctrl-C, once the checkpoints are written."""


class AdapterCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that never writes diverged adapters and stops on Ctrl-C at a step boundary."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Set here, not in on_train_start: on_exception runs for errors raised before training starts too.
        self._interrupt_requested = False
        self._interrupt_saved = False
        self._previous_handler = None
        self._state_is_good = True  # False from a validation with a non-finite monitored value to the next finite one
        self._last_good_path = ""  # the newest checkpoint of a good state: this run's last, or the one it resumed from

    @property
    def state_key(self) -> str:
        # The same key as ModelCheckpoint's, so checkpoints of either resume with the other.
        return self._generate_state_key(
            monitor=self.monitor, mode=self.mode, every_n_train_steps=self._every_n_train_steps,
            every_n_epochs=self._every_n_epochs, train_time_interval=self._train_time_interval,
        ).replace(type(self).__qualname__, "ModelCheckpoint", 1)

    # ------------------------------------------------------------------ non-finite adapters
    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        try:
            super()._save_checkpoint(trainer, filepath)
        except NonFiniteAdapterError as err:
            self._skipped_bad = True
            rank_zero_warn(f"not writing {filepath}: {err}. The existing checkpoints keep the last good adapters.")

    def _save_last_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict[str, torch.Tensor]) -> None:
        if getattr(self, "_skipped_bad", False) or _diverged(trainer):
            rank_zero_warn(f"not updating the last checkpoint ({self.last_model_path or 'last.ckpt'}): the adapters "
                           "are non-finite or diverged; it keeps the last good ones.")
            return
        super()._save_last_checkpoint(trainer, monitor_candidates)
        if not getattr(self, "_skipped_bad", False):
            self._last_good_path = self.last_model_path

    @property
    def last_good_checkpoint(self) -> str:
        """The checkpoint to resume from after a failure: the newest one written of a good state.

        ``last.ckpt`` once this run has written it, else the checkpoint this run resumed from, else
        the best top-k file ("" before any).
        """
        return self._last_good_path or self.best_model_path or ""

    def _save_topk_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict[str, torch.Tensor]) -> None:
        if _diverged(trainer):
            rank_zero_warn(f"not writing a checkpoint at step {trainer.global_step}: the adapters are non-finite or diverged")
            return
        bad = _non_finite_monitor(self.monitor, monitor_candidates)
        if bad is not None:
            rank_zero_warn(f"not writing a checkpoint at step {trainer.global_step}: {self.monitor} = {bad} (the "
                           f"state is not good); the last good checkpoint ({self.last_good_checkpoint or 'none yet'}) is kept")
            return
        super()._save_topk_checkpoint(trainer, monitor_candidates)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Lightning's saves, then ``last.ckpt`` at every good validation (not only where a top-k file was written).

        Lightning 2.6 updates ``last.ckpt`` only when it also wrote a top-k checkpoint at that step,
        so with ``save_top_k`` full of better losses ``--ckpt_path last`` resumed from an older step
        than the run had reached. A validation with a non-finite monitored value is no good state:
        neither file is written then.
        """
        super().on_validation_end(trainer, pl_module)
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        candidates = self._monitor_candidates(trainer)
        self._state_is_good = _non_finite_monitor(self.monitor, candidates) is None
        if self._state_is_good and self._should_update_last(trainer):
            self._save_last_checkpoint(trainer, candidates)

    def _should_update_last(self, trainer: pl.Trainer) -> bool:
        return (bool(self.save_last) and not trainer.sanity_checking and not trainer.fast_dev_run
                and trainer.state.fn == "fit" and self._last_global_step_saved != trainer.global_step)

    # ------------------------------------------------------------------ Ctrl-C at a step boundary
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._last_good_path = self._last_good_path or str(trainer.ckpt_path or "")
        self._interrupt_requested = False
        self._interrupt_saved = False
        self._previous_handler = None
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._previous_handler = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum, frame) -> None:
        if self._interrupt_requested:  # second Ctrl-C: stop now
            self._restore_handler()
            raise KeyboardInterrupt
        self._interrupt_requested = True
        print("\nCtrl-C: stopping after the current step (checkpoint at the step boundary); "
              "press Ctrl-C again to stop at once without one", flush=True)

    def _restore_handler(self) -> None:
        if self._previous_handler is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous_handler)
            self._previous_handler = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not self._interrupt_requested_everywhere(trainer):
            return
        if trainer.fit_loop._should_accumulate():  # mid-accumulation is not a step boundary yet
            return
        self._restore_handler()
        candidates = self._monitor_candidates(trainer)
        filepath = os.path.join(self.dirpath or ".", f"step{trainer.global_step:06d}-interrupted{self.FILE_EXTENSION}")
        self._save_checkpoint(trainer, filepath)
        self._save_last_checkpoint(trainer, candidates)
        self._interrupt_saved = True
        rank_zero_info(f"Interrupted at global step {trainer.global_step}: saved {filepath} and the last checkpoint; "
                       f"resume with --ckpt_path {self.last_model_path or filepath}")
        raise GracefulInterrupt(f"interrupted by Ctrl-C at global step {trainer.global_step}")

    def _interrupt_requested_everywhere(self, trainer: pl.Trainer) -> bool:
        requested = getattr(self, "_interrupt_requested", False)
        if trainer.world_size > 1:  # all ranks stop at the same step, or the others would hang
            flag = torch.tensor(int(requested), device=trainer.strategy.root_device)
            flag = trainer.strategy.reduce(flag, reduce_op="sum")
            requested = int(flag) > 0
        return requested

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """``last.ckpt`` is the state the fit ended with (the one MergeExport exports), when it is good."""
        self._restore_handler()
        super().on_train_end(trainer, pl_module)
        if self._state_is_good and self._should_update_last(trainer) and not _diverged(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    # ------------------------------------------------------------------ other exceptions
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_handler()
        if getattr(self, "_interrupt_saved", False):
            return  # written at the step boundary already
        if not self._should_save_on_exception(trainer):
            return
        if isinstance(exception, KeyboardInterrupt):
            rank_zero_warn("stopped in the middle of a step (second Ctrl-C): no checkpoint written; "
                           f"the last one ({self.last_model_path or 'none yet'}) is kept")
            return
        if _diverged(trainer) or isinstance(exception, FloatingPointError):
            rank_zero_warn(f"{type(exception).__name__}: not writing an exception checkpoint: the adapters are non-finite, diverged or "
                           f"gave a non-finite loss; the last good checkpoint ({self.last_good_checkpoint or 'none yet'}) is kept")
            return
        filepath = os.path.join(self.dirpath or ".", f"step{trainer.global_step:06d}-exception{self.FILE_EXTENSION}")
        self._save_checkpoint(trainer, filepath)
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        rank_zero_info(f"{type(exception).__name__}: {exception}; saved checkpoint to {filepath}")


def _non_finite_monitor(monitor: str | None, candidates: dict[str, torch.Tensor]) -> float | None:
    """The monitored value when it is NaN / inf (a state that must not become a checkpoint), else None."""
    value = candidates.get(monitor) if monitor else None
    if value is None:
        return None
    value = float(value)
    return None if math.isfinite(value) else value


def _diverged(trainer: pl.Trainer) -> bool:
    """Whether the module flagged divergence, or (unsharded) any trainable parameter is NaN / inf."""
    module = trainer.lightning_module
    if module is None:
        return False
    if getattr(module, "_diverged", None):
        return True
    if trainer.world_size > 1:  # sharded parameters: the module's flag (agreed by all ranks) decides
        return False
    return any(p.requires_grad and not bool(torch.isfinite(p.detach()).all()) for p in module.parameters())
