"""Test callbacks that inject faults into a real `main.py fit` run: signals, diverged adapters."""

from __future__ import annotations

import os
import signal

import lightning.pytorch as pl


class SignalAtStep(pl.Callback):
    """Send ``signal_name`` (``SIGINT``, ``SIGKILL``) to this process when global step ``step`` starts.

    The signal arrives during the step (in ``on_train_batch_start``, before the forward), as a
    Ctrl-C or a ``kill -9`` from outside would: the step's work is then still to be done.
    """

    def __init__(self, step: int, signal_name: str = "SIGINT") -> None:
        self.step = step
        self.signal_name = signal_name
        self.sent = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self.sent and trainer.global_step == self.step:
            self.sent = True
            print(f"signal_at_step: sending {self.signal_name} at global step {trainer.global_step}", flush=True)
            os.kill(os.getpid(), getattr(signal, self.signal_name))


class PoisonAdapters(pl.Callback):
    """Fill every adapter with NaN after the optimizer step of global step ``step`` (a diverged update)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def edit(self, param) -> None:
        param.fill_(float("nan"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            import torch

            with torch.no_grad():
                for param in pl_module.parameters():
                    if param.requires_grad:
                        self.edit(param)


class RaiseAtStep(pl.Callback):
    """Raise a RuntimeError (a stand-in for a defect, not a user error) when global step ``step`` starts."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"injected defect at step {self.step}")


class ScaleAdapters(PoisonAdapters):
    """Multiply every adapter by ``factor`` after the optimizer step of global step ``step`` (finite, but huge)."""

    def __init__(self, step: int, factor: float) -> None:
        super().__init__(step)
        self.factor = factor

    def edit(self, param) -> None:
        param.mul_(self.factor)


class CollapseToUniform(pl.Callback):
    """Zero the final norm after global step ``step`` (or when ``test`` starts, ``step=-1``): every
    logit becomes 0, a uniform prediction."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            self.collapse(pl_module)

    def on_test_start(self, trainer, pl_module) -> None:
        if self.step == -1:
            self.collapse(pl_module)

    @staticmethod
    def collapse(pl_module) -> None:
        import torch

        with torch.no_grad():
            pl_module.model.model.norm.weight.zero_()
