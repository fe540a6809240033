"""Rank-balance diagnostics: how much rank each adapter's update actually uses.

The paper's thesis (docs/method.md, opening and section 2): at a fixed parameter budget, LoRA's
update is stuck at rank ``r`` while Q-BLoRA / QA-BLoRA simplify the adapter's input and
output and spend the freed parameters on rank. This callback measures that during training.
For every adapted layer it reads the spectrum of the dense update ``dW`` from the adapter's
factors (:meth:`AdapterModule.update_singular_values`, never materialising ``dW``) and logs:

* effective rank ``exp(H(p))`` with ``p_i = s_i / sum_j s_j`` (Roy & Vetterli, 2007): how many
  directions the update spreads its energy over, between 1 and the layer's maximum rank;
* stable rank ``||dW||_F^2 / ||dW||_2^2 = sum s_i^2 / s_1^2``: a robust lower bound on rank;
* the top-``k`` singular values;
* the relative update size ``||dW||_F / ||W_hat||_F`` (``W_hat`` = the dequantized frozen base);
* the adapters' gradient norm (before clipping) on the logged steps.

Scalars are means over the layers of a group (the projection's name: ``q_proj`` ... ``down_proj``)
and over all layers; a TensorBoard logger also gets a singular-value histogram per group and a
spectrum figure. A summary table is printed at the end of fit. See docs/rank_balance.md.
"""

from __future__ import annotations

import math
import sys
import weakref
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from torch import nn

from qblora_pl.adapters.base import AdaptedLinear
from qblora_pl.adapters.injection import LLAMA_TARGET_MODULES, adapted_layers, format_table
from qblora_pl.quantization.base_layers import dequantized_weight

PREFIX = "rank_balance"


@dataclass
class UpdateSpectrum:
    """Spectrum statistics of one layer's update ``dW``.

    ``max_rank`` is the rank the adapter's structure allows (the number of singular values
    the adapter reports: ``r`` for LoRA, ``min(m r, d_out/k_out, d_in/k_in)`` for Q-BLoRA,
    ``min(d_out/k_out, d_in/w)`` for QA-BLoRA). An all-zero update (LoRA's ``B = 0`` and
    QA-BLoRA's ``M = 0`` at initialisation) has effective and stable rank 0.
    """

    singular_values: torch.Tensor  # descending, float32, on the CPU
    effective_rank: float
    stable_rank: float
    frobenius_norm: float
    max_rank: int
    top: list[float] = field(default_factory=list)


def spectrum_statistics(singular_values: torch.Tensor, top_k: int = 4) -> UpdateSpectrum:
    """Effective rank, stable rank, Frobenius norm and top-``k`` values of a spectrum.

    Non-finite singular values (a diverged adapter) give NaN ranks rather than hiding it.
    """
    s = singular_values.detach().float().flatten().cpu().abs().sort(descending=True).values
    frobenius = float(s.square().sum().sqrt()) if s.numel() else 0.0
    s_max = float(s[0]) if s.numel() else 0.0
    if not math.isfinite(s_max) or not math.isfinite(frobenius):
        effective = stable = math.nan
    elif s_max == 0.0:
        effective = stable = 0.0
    else:
        p = s / s.sum()
        p = p[p > 0]  # 0 log 0 = 0
        effective = float(torch.exp(-(p * p.log()).sum()))
        stable = float(s.square().sum() / (s_max * s_max))
    top = [float(v) for v in s[:top_k]]
    return UpdateSpectrum(s, effective, stable, frobenius, int(s.numel()), top)


def layer_group(name: str) -> str:
    """The group a layer is aggregated in: the last component of its name (``q_proj``)."""
    return name.rsplit(".", 1)[-1]


class RankBalanceDiagnostics(Callback):
    """Log how much rank the adapters' updates use (effective / stable rank, spectra).

    Every ``every_n_steps`` optimizer steps, and once when training ends, reads each adapted
    layer's update spectrum from its factors and logs means per layer group and overall to
    every logger; TensorBoard also gets histograms and a spectrum figure. Cost at the default
    interval is well under 1% of step time (docs/rank_balance.md).

    Args:
        every_n_steps: log every N optimizer (global) steps; also once at the end of training.
        top_k: how many of the largest singular values to log per layer group.
        log_images: log a figure of the normalised spectra (one line per layer group) to
            TensorBoard.
        log_histograms: log a histogram of the singular values per layer group to TensorBoard.
        print_summary: print a table per layer group (effective rank, stable rank, maximum
            possible rank, relative update norm) at the end of training.
        log_per_layer: also log effective / stable rank and relative norm of every single layer
            (many scalars on a large model).
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        top_k: int = 4,
        log_images: bool = True,
        log_histograms: bool = True,
        print_summary: bool = True,
        log_per_layer: bool = False,
    ) -> None:
        super().__init__()
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps={every_n_steps} must be >= 1")
        if top_k < 0:
            raise ValueError(f"top_k={top_k} must be >= 0")
        self.every_n_steps = every_n_steps
        self.top_k = top_k
        self.log_images = log_images
        self.log_histograms = log_histograms
        self.print_summary = print_summary
        self.log_per_layer = log_per_layer
        # Resumable state: the last step logged, so a resumed run does not log a step twice.
        self.last_logged_step = -1
        # Not checkpointed: derived from the frozen base, or the latest values for readers.
        # Keyed by the base module itself, so a callback reused on another model never
        # returns a stale norm.
        self._base_norms: weakref.WeakKeyDictionary[nn.Module, float] = weakref.WeakKeyDictionary()
        self._grad_norms: dict[str, float] | None = None
        self._grad_norms_step = -1
        self.latest: dict[str, UpdateSpectrum] = {}
        self._disabled = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps)

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Sharded strategies hold a shard of each factor per rank outside forward: the
        # spectrum of a shard is not the update's, so rather log nothing than something wrong.
        strategy = type(trainer.strategy).__name__
        if "FSDP" in strategy or "ModelParallel" in strategy or "DeepSpeed" in strategy:
            rank_zero_warn(f"RankBalanceDiagnostics is disabled under {strategy}: adapter factors are sharded")
            self._disabled = True

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        # Called after the backward pass and before gradient clipping: the raw gradient.
        step = trainer.global_step + 1  # the step this optimizer update completes
        if self._disabled or not self._is_log_step(step):
            return
        self._capture_grad_norms(pl_module, step)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self._disabled or step == 0 or step == self.last_logged_step or not self._is_log_step(step):
            return
        self._diagnose(trainer, pl_module, step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._disabled:
            return
        if trainer.global_step != self.last_logged_step:
            self._diagnose(trainer, pl_module, trainer.global_step)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._disabled or not self.print_summary:
            return
        if not self.latest:  # e.g. resumed at max_steps: no training ran, so nothing was measured
            self._measure_latest(pl_module)
            self._print_summary(pl_module, trainer.global_step)
        else:
            self._print_summary(pl_module, self.last_logged_step)

    def state_dict(self) -> dict[str, Any]:
        return {"last_logged_step": self.last_logged_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_logged_step = int(state_dict.get("last_logged_step", -1))

    # ------------------------------------------------------------------ measuring
    def _is_log_step(self, step: int) -> bool:
        return step > 0 and step % self.every_n_steps == 0

    @staticmethod
    def _layers(pl_module: pl.LightningModule) -> dict[str, AdaptedLinear]:
        model = getattr(pl_module, "model", None)
        return adapted_layers(model if model is not None else pl_module)

    @rank_zero_only
    @torch.no_grad()
    def _capture_grad_norms(self, pl_module: pl.LightningModule, step: int) -> None:
        squares: dict[str, list[torch.Tensor]] = defaultdict(list)
        for name, layer in self._layers(pl_module).items():
            for p in layer.adapter.parameters():
                if p.grad is not None:
                    squares[layer_group(name)].append(p.grad.detach().float().square().sum())
        if not squares:
            return
        groups = list(squares)
        per_group = torch.stack([torch.stack(v).sum() for v in squares.values()])
        values = per_group.sqrt().tolist() + [float(per_group.sum().sqrt())]  # one device sync
        self._grad_norms = dict(zip([*groups, ""], values))
        self._grad_norms_step = step

    def base_norm(self, layer: AdaptedLinear) -> float:
        """``||W_hat||_F`` of a layer's frozen base, computed once (the base never trains).

        Measured on the unmerged base; a layer first seen merged would include ``dW``.
        """
        base = layer.base_layer
        if base not in self._base_norms:
            self._base_norms[base] = float(torch.linalg.vector_norm(dequantized_weight(base, torch.float32)))
        return self._base_norms[base]

    def relative_update_norm(self, layer: AdaptedLinear, spectrum: UpdateSpectrum) -> float:
        """``||dW||_F / ||W_hat||_F``: how far the update moves the layer."""
        return spectrum.frobenius_norm / max(self.base_norm(layer), 1e-30)

    @torch.no_grad()
    def measure(self, pl_module: pl.LightningModule) -> dict[str, UpdateSpectrum]:
        """The update spectrum of every adapted layer, by qualified name."""
        layers = self._layers(pl_module)
        if not layers:
            return {}
        spectra = {
            name: spectrum_statistics(layer.adapter.update_singular_values(), self.top_k)
            for name, layer in layers.items()
        }
        for layer in layers.values():
            self.base_norm(layer)  # first call only: dequantize the frozen base once
        return spectra

    def group_summary(
        self, pl_module: pl.LightningModule, spectra: dict[str, UpdateSpectrum] | None = None
    ) -> dict[str, dict[str, Any]]:
        """Means over the layers of each group (and ``all``): the numbers logged and printed."""
        spectra = self.latest if spectra is None else spectra
        layers = self._layers(pl_module)
        members: dict[str, list[str]] = defaultdict(list)
        for name in spectra:
            members[layer_group(name)].append(name)
        known = [g for g in LLAMA_TARGET_MODULES if g in members]
        order = known + sorted(g for g in members if g not in known)
        summary: dict[str, dict[str, Any]] = {}
        for group in [*order, "all"]:
            names = list(spectra) if group == "all" else members[group]
            if not names:
                continue
            stats = [spectra[n] for n in names]
            summary[group] = {
                "layers": len(names),
                "effective_rank": _mean(s.effective_rank for s in stats),
                "stable_rank": _mean(s.stable_rank for s in stats),
                "max_rank": _mean(s.max_rank for s in stats),
                "effective_rank_fraction": _mean(s.effective_rank / max(s.max_rank, 1) for s in stats),
                "relative_update_norm": _mean(self.relative_update_norm(layers[n], s) for n, s in zip(names, stats)),
                "shape": _common({f"{layers[n].out_features} x {layers[n].in_features}" for n in names}),
            }
            for i in range(self.top_k):
                values = [s.top[i] for s in stats if i < len(s.top)]
                if values:
                    summary[group][f"top_singular_value/{i + 1}"] = _mean(values)
        return summary

    # ------------------------------------------------------------------ logging
    @rank_zero_only
    def _measure_latest(self, pl_module: pl.LightningModule) -> None:
        self.latest = self.measure(pl_module)

    @rank_zero_only
    def _diagnose(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        spectra = self.measure(pl_module)
        self.latest = spectra
        self.last_logged_step = step
        if not spectra:
            return
        summary = self.group_summary(pl_module, spectra)
        metrics = self._scalars(summary, spectra, pl_module, step)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        tensorboard = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        if tensorboard is not None and (self.log_histograms or self.log_images):
            self._log_tensorboard(tensorboard.experiment, spectra, pl_module, step)

    def _scalars(
        self, summary: dict, spectra: dict[str, UpdateSpectrum], pl_module: pl.LightningModule, step: int
    ) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for group, row in summary.items():
            if group == "all":
                for key in ("effective_rank", "stable_rank", "effective_rank_fraction", "relative_update_norm"):
                    metrics[f"{PREFIX}/{key}_mean"] = row[key]
                continue
            for key in ("effective_rank", "stable_rank", "relative_update_norm"):
                metrics[f"{PREFIX}/{key}/{group}"] = row[key]
            for i in range(1, self.top_k + 1):
                if f"top_singular_value/{i}" in row:
                    metrics[f"{PREFIX}/top_singular_value/{group}/{i}"] = row[f"top_singular_value/{i}"]
        if self._grad_norms is not None and self._grad_norms_step == step:
            for group, value in self._grad_norms.items():
                metrics[f"{PREFIX}/grad_norm" + (f"/{group}" if group else "")] = value
        if self.log_per_layer:
            layers = self._layers(pl_module)
            for name, s in spectra.items():
                metrics[f"{PREFIX}/layer/{name}/effective_rank"] = s.effective_rank
                metrics[f"{PREFIX}/layer/{name}/stable_rank"] = s.stable_rank
                metrics[f"{PREFIX}/layer/{name}/relative_update_norm"] = self.relative_update_norm(layers[name], s)
        return metrics

    def _log_tensorboard(
        self, writer: Any, spectra: dict[str, UpdateSpectrum], pl_module: pl.LightningModule, step: int
    ) -> None:
        by_group: dict[str, list[torch.Tensor]] = defaultdict(list)
        for name, s in spectra.items():
            by_group[layer_group(name)].append(s.singular_values)
        if self.log_histograms:
            for group, values in by_group.items():
                values = torch.cat(values)
                if values.numel() and torch.isfinite(values).all():
                    writer.add_histogram(f"{PREFIX}/singular_values/{group}", values, global_step=step)
        if self.log_images:
            figure = self._spectrum_figure(by_group, f"{_method_name(pl_module)} update spectrum, step {step}")
            writer.add_figure(f"{PREFIX}/spectrum", figure, global_step=step, close=True)

    @staticmethod
    def _spectrum_figure(by_group: dict[str, list[torch.Tensor]], title: str):
        """Normalised spectrum ``s_i / s_1`` vs index, averaged over each group's layers."""
        from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

        figure = Figure(figsize=(6, 4), dpi=80)
        axes = figure.add_subplot()
        for group, spectra in by_group.items():
            length = max(len(s) for s in spectra)
            normalised = torch.zeros(len(spectra), length)
            for row, s in enumerate(spectra):
                if len(s) and float(s[0]) > 0 and math.isfinite(float(s[0])):
                    normalised[row, : len(s)] = s / s[0]
            axes.plot(range(1, length + 1), normalised.mean(0).numpy(), label=group, marker="." if length <= 64 else None)
        axes.set_xlabel("singular value index i")
        axes.set_ylabel("s_i / s_1 (mean over layers)")
        axes.set_ylim(0, 1.05)
        axes.set_title(title)
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
        figure.subplots_adjust(left=0.12, right=0.97, bottom=0.13, top=0.92)  # tight_layout: +60 ms a figure
        return figure

    @rank_zero_only
    def _print_summary(self, pl_module: pl.LightningModule, step: int) -> None:
        print(self.summary_table(pl_module, step), file=sys.stdout, flush=True)

    def summary_table(self, pl_module: pl.LightningModule, step: int | None = None) -> str:
        """The end-of-fit table: one row per layer group and an ``all`` row (means over layers)."""
        if not self.latest:
            return "rank balance: no adapted layers"
        rows = [
            {
                "group": group,
                "layers": row["layers"],
                "d_out x d_in": row["shape"],
                "max rank": f"{row['max_rank']:g}",
                "eff. rank": f"{row['effective_rank']:.2f}",
                "stable rank": f"{row['stable_rank']:.2f}",
                "eff/max": f"{100 * row['effective_rank_fraction']:.0f}%",
                "|dW|/|W|": f"{row['relative_update_norm']:.2e}",
            }
            for group, row in self.group_summary(pl_module).items()
        ]
        step = self.last_logged_step if step is None else step
        return f"Rank balance of the adapter updates at step {step}:\n" + format_table(rows)


def _method_name(pl_module: pl.LightningModule) -> str:
    """The adapter strategy's class name (``QBLoRA``) when the module exposes it."""
    strategy = getattr(pl_module, "adapter", None)
    return type(strategy).__name__ if strategy is not None else "adapter"


def _mean(values) -> float:
    values = list(values)
    return float(sum(values) / len(values)) if values else math.nan


def _common(values: set[str]) -> str:
    return next(iter(values)) if len(values) == 1 else "mixed"
