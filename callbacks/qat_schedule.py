"""QAT fake-quantization schedule (docs/method.md section 5).

Turns fake quantization on after a warm-up, ramps its strength, optionally anneals the bit
width (e.g. 8 -> 6 -> 4), and logs the current bits, strength and quantization error:

* LoRA / Q-BLoRA: the merged weight ``W_hat + dW`` is fake-quantized to the INT-b grid the
  model will be exported to (:class:`qblora_pl.qat.MergedWeightFakeQuant`), so the adapter
  learns that grid instead of suffering it after training;
* QA-LoRA / QA-BLoRA: the merge is exact in our format, but a target format with integer
  zero points (or fp16 offsets, GGUF Q4_1) rounds the merged offsets - those are
  fake-quantized instead (:class:`qblora_pl.qat.MergedOffsetFakeQuant`).

The schedule is a pure function of the global step, and the callback's state (last applied
phase) is saved in checkpoints, so a resumed run continues where it stopped.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import lightning.pytorch as pl
import torch

from qblora_pl.adapters.injection import adapted_layers
from qblora_pl.distributed import is_sharded
from qblora_pl.qat import MergedOffsetFakeQuant, MergedWeightFakeQuant


@dataclass(frozen=True)
class QATPhase:
    """What the schedule prescribes at one step."""

    enabled: bool
    bits: int
    strength: float


class QATSchedule(pl.Callback):
    """Schedule fake quantization over training.

    Args:
        start_step: global step at which fake quantization turns on (0 = from the start).
        ramp_steps: steps over which its strength rises linearly from 0 to 1 after ``start_step``.
        bits: target bit width of the export (LoRA / Q-BLoRA merged weights).
        group_size: quantization group size of the export.
        anneal_bits: bit widths used before ``bits``, in order (e.g. ``[8, 6]``), each for
            ``anneal_steps`` steps starting at ``start_step``.
        anneal_steps: steps spent at each annealing bit width.
        zero_point: for QA-* methods, the export's offset format: ``integer`` zero points
            (GPTQ / AWQ style) or ``float16`` offsets (GGUF Q4_1).
        scale_dtype: storage dtype of the export's scales (must match the exporter).
        log_every_n_steps: how often to log bits, strength and quantization error.
    """

    def __init__(
        self,
        start_step: int = 0,
        ramp_steps: int = 0,
        bits: int = 4,
        group_size: int = 32,
        anneal_bits: list[int] | None = None,
        anneal_steps: int = 0,
        zero_point: Literal["integer", "float16"] = "float16",
        scale_dtype: Literal["float16", "bfloat16", "float32"] = "float16",
        log_every_n_steps: int = 10,
    ) -> None:
        from qblora_pl.quantization.int_quantizer import GroupwiseIntQuantizer

        GroupwiseIntQuantizer(bits, group_size)  # the export's width must be packable
        for bits_value in anneal_bits or []:
            GroupwiseIntQuantizer(bits_value, group_size, packable=False)
        if start_step < 0 or ramp_steps < 0 or anneal_steps < 0:
            raise ValueError(
                f"start_step={start_step}, ramp_steps={ramp_steps} and anneal_steps={anneal_steps} must be >= 0"
            )
        if anneal_bits and anneal_steps == 0:
            raise ValueError(f"anneal_bits={anneal_bits} needs anneal_steps > 0")
        self.start_step, self.ramp_steps = start_step, ramp_steps
        self.bits, self.group_size = bits, group_size
        self.anneal_bits, self.anneal_steps = list(anneal_bits or []), anneal_steps
        self.zero_point = zero_point
        self.scale_dtype = getattr(torch, scale_dtype)
        self.log_every_n_steps = max(1, log_every_n_steps)
        self.applied: QATPhase | None = None

    def phase(self, step: int) -> QATPhase:
        """The schedule at ``step``: on/off, bit width and strength."""
        if step < self.start_step:
            return QATPhase(False, self.bits, 0.0)
        since = step - self.start_step
        strength = 1.0 if self.ramp_steps == 0 else min(1.0, (since + 1) / self.ramp_steps)
        stage = since // self.anneal_steps if self.anneal_steps else len(self.anneal_bits)
        bits = self.anneal_bits[stage] if stage < len(self.anneal_bits) else self.bits
        return QATPhase(True, bits, strength)

    def _fake_quant(self, layer, phase: QATPhase):
        if layer.merges_into_offsets:
            return MergedOffsetFakeQuant(zero_point=self.zero_point, strength=phase.strength)
        return MergedWeightFakeQuant(bits=phase.bits, group_size=self.group_size, scale_dtype=self.scale_dtype, strength=phase.strength)

    def apply(self, pl_module: pl.LightningModule, step: int) -> QATPhase:
        phase = self.phase(step)
        if phase != self.applied:
            for layer in adapted_layers(pl_module).values():
                layer.fake_quant = self._fake_quant(layer, phase) if phase.enabled else None
            self.applied = phase
        return phase

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for name, layer in adapted_layers(pl_module).items():
            if not layer.merges_into_offsets and layer.in_features % self.group_size:
                raise ValueError(
                    f"layer {name}: d_in={layer.in_features} is not divisible by the QAT group_size={self.group_size}"
                )

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        phase = self.apply(pl_module, trainer.global_step)
        if trainer.global_step % self.log_every_n_steps == 0:
            metrics = {"qat/enabled": float(phase.enabled), "qat/bits": float(phase.bits), "qat/strength": phase.strength}
            # Under FSDP the layers hold shards outside forward; the error of a shard is not the layer's.
            if phase.enabled and not is_sharded(pl_module):
                errors = [layer.fake_quant.relative_error(layer) for layer in adapted_layers(pl_module).values()]
                metrics["qat/relative_quant_error"] = sum(errors) / len(errors)
            pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)

    def state_dict(self) -> dict[str, Any]:
        return {"applied": asdict(self.applied) if self.applied else None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # The schedule itself is a function of the restored global step; the last applied
        # phase is kept so that a resumed run can be checked against it.
        applied = state_dict.get("applied")
        self.restored_phase = QATPhase(**applied) if applied else None
