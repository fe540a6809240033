"""Fake quantization for quantization-aware fine-tuning (docs/method.md section 5).

A fake quantizer is attached to an :class:`~qblora_pl.adapters.base.AdaptedLinear` (by the
``QATSchedule`` callback) and replaces its forward by ``x W_q^T + b`` where ``W_q`` is the
weight the chosen export will hold, with a straight-through estimator so gradients reach
the adapter as if no rounding happened:

* :class:`MergedWeightFakeQuant` - LoRA / Q-BLoRA exported to INT-b: ``W_q = Q(W_hat + dW)``
  with the same min-max round-to-nearest quantizer and scale dtype the export uses.
* :class:`MergedOffsetFakeQuant` - QA-LoRA / QA-BLoRA exported to a format whose zero point
  is an integer (GPTQ / AWQ style, ``w = scale * (q - z)``): the merged offsets
  ``offset + delta`` are rounded to ``-scale * z``, ``z`` an integer in ``0 .. 2^b - 1``; or
  to fp16 (GGUF Q4_1's ``m``).

``strength`` in [0, 1] blends the fake-quantized weight in (``W + strength * (W_q - W)``),
so a schedule can ramp it; at 1 the forward pass is exactly the exported model's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from qblora_pl.quantization.base_layers import dequantized_weight
from qblora_pl.quantization.int_layer import GroupwiseIntLinear
from qblora_pl.quantization.int_quantizer import GroupwiseIntQuantizer


def straight_through(value: torch.Tensor, rounded: torch.Tensor) -> torch.Tensor:
    """Forward ``rounded``, backward identity to ``value``."""
    return value + (rounded - value).detach()


@dataclass
class MergedWeightFakeQuant:
    """Fake-quantize the merged weight ``W_hat + dW`` to group-wise INT-b (RTN min-max)."""

    bits: int = 4
    group_size: int = 32
    scale_dtype: torch.dtype = torch.float16
    strength: float = 1.0

    def weight(self, layer) -> torch.Tensor:
        merged = dequantized_weight(layer.base_layer, torch.float32) + layer.adapter.delta_weight().float()
        quantizer = GroupwiseIntQuantizer(self.bits, self.group_size, packable=False)
        fake = quantizer.fake_quantize(merged, param_dtype=self.scale_dtype)
        return merged + self.strength * (fake - merged)

    @torch.no_grad()
    def relative_error(self, layer) -> float:
        merged = dequantized_weight(layer.base_layer, torch.float32) + layer.adapter.delta_weight().float()
        quantizer = GroupwiseIntQuantizer(self.bits, self.group_size, packable=False)
        fake = quantizer.dequantize(*quantizer.quantize(merged, self.scale_dtype))
        return float((fake - merged).norm() / merged.norm().clamp_min(1e-12))


@dataclass
class MergedOffsetFakeQuant:
    """Fake-quantize a QA-* layer's merged offsets to the export format's zero points."""

    zero_point: Literal["integer", "float16"] = "integer"
    strength: float = 1.0

    @staticmethod
    def _scales(layer) -> torch.Tensor:
        """The scales the export stores: the base's, or with the adapter's learned update (``scale_rank``)."""
        trained = layer.trained_scales()
        return layer.base_layer.scales if trained is None else trained

    def _offsets(self, layer, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        base: GroupwiseIntLinear = layer.base_layer
        merged = base.offsets.float() + layer.adapter.group_offset_delta(base.group_size).float()
        if self.zero_point == "integer":
            _, rounded = base.quantizer.integer_zero_points(scales.float(), merged)
        else:
            rounded = merged.half().float()
        return merged, rounded

    def weight(self, layer) -> torch.Tensor:
        base: GroupwiseIntLinear = layer.base_layer
        scales = self._scales(layer)  # once per forward: the learned update is a matmul
        merged, rounded = self._offsets(layer, scales)
        offsets = merged + self.strength * (straight_through(merged, rounded) - merged)
        return base.quantizer.dequantize(base.codes(), scales, offsets)

    @torch.no_grad()
    def relative_error(self, layer) -> float:
        base = layer.base_layer
        scales = self._scales(layer)
        merged, rounded = self._offsets(layer, scales)
        exact = base.quantizer.dequantize(base.codes(), scales, merged)
        fake = base.quantizer.dequantize(base.codes(), scales, rounded)
        return float((fake - exact).norm() / exact.norm().clamp_min(1e-12))
