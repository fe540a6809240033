"""A format-neutral view of a merged model, shared by every exporter.

After :func:`qblora_pl.merging.merge_adapters` each target layer of the model is one of:

* a :class:`GroupwiseIntLinear` whose offsets carry the folded QA-LoRA / QA-BLoRA update
  (exact, still b-bit, docs/method.md sections 3-4; merged offsets are float32);
* a dense ``nn.Linear`` holding ``W_hat + dW`` (LoRA / Q-BLoRA, docs/method.md sections 1-2);

and the other linear layers are frozen bases (INT-b, NF4 from bitsandbytes or torchao, or dense,
such as the ``lm_head``). :func:`snapshot_merged_model` reads all of that into :class:`ModelSnapshot`:
linear layers by their Hugging Face module name, with either the INT-b parts (codes, scales,
offsets) or a dense weight, plus every other tensor of the state dict (embeddings, norms). The
exporters only ever read a snapshot; none of them touches the adapter classes.

Tensors are moved to the CPU but not copied: take the snapshot while the model is merged and
finish writing before anything changes the model's weights in place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from qblora_pl.adapters.base import AdaptedLinear
from qblora_pl.quantization.base_layers import dequantized_weight, is_base_linear, is_nf4_linear, is_torchao_nf4_linear
from qblora_pl.quantization.int_layer import GroupwiseIntLinear
from qblora_pl.quantization.int_quantizer import GroupwiseIntQuantizer

# How a linear layer came to hold its current weight; recorded in every export's layer map.
MERGED_OFFSETS = "merged into INT-b offsets (exact)"
MERGED_DENSE = "merged dense W_hat + dW"
FROZEN_INT = "frozen INT-b base"
FROZEN_NF4 = "frozen NF4 base (dequantized)"
FROZEN_DENSE = "frozen dense"


class ExportFallbackWarning(UserWarning):
    """An export could not keep a layer exactly and used a documented lossy fallback."""


@dataclass
class QuantizedParts:
    """One INT-b layer in the project's format: ``W = scale[G] * q + offset[G]``."""

    codes: Tensor  # uint8 (d_out, d_in), one code per byte
    scales: Tensor  # (d_out, d_in / group_size), stored dtype
    offsets: Tensor  # (d_out, d_in / group_size), stored dtype (float32 after a QA-* merge)
    bits: int
    group_size: int

    def dequantize(self) -> Tensor:
        """``W_hat`` in float32 through the project's one dequantization formula."""
        return GroupwiseIntQuantizer(self.bits, self.group_size).dequantize(self.codes, self.scales, self.offsets)


@dataclass
class LinearSnapshot:
    """A linear layer of the merged model: INT-b parts or a dense weight, and its bias."""

    name: str
    d_out: int
    d_in: int
    origin: str
    quantized: QuantizedParts | None = None
    weight: Tensor | None = None  # dense (d_out, d_in), its own dtype
    bias: Tensor | None = None

    @property
    def is_quantized(self) -> bool:
        return self.quantized is not None

    def dense_weight(self) -> Tensor:
        """The layer's weight as a float32 ``(d_out, d_in)`` matrix."""
        if self.quantized is not None:
            return self.quantized.dequantize()
        return self.weight.float()


@dataclass
class ModelSnapshot:
    """Everything an exporter needs: the HF config, linear layers and the remaining tensors."""

    config: Any  # transformers PretrainedConfig (a deep copy, without quantization_config)
    linears: dict[str, LinearSnapshot]
    others: dict[str, Tensor]  # state-dict name -> tensor (embeddings, norms, ...)
    merge_how: dict[str, str] = field(default_factory=dict)

    @property
    def tied_embeddings(self) -> bool:
        return bool(getattr(self.config, "tie_word_embeddings", False))


@torch.no_grad()
def snapshot_merged_model(model: nn.Module, merge_how: dict[str, str] | None = None) -> ModelSnapshot:
    """Read a (merged) Hugging Face causal LM into a :class:`ModelSnapshot`.

    Every adapted layer must be merged: an unmerged adapter's update would silently be
    missing from the export.
    """
    import copy

    linears: dict[str, LinearSnapshot] = {}
    for name, module in model.named_modules():
        if not name or any(name.startswith(prefix + ".") for prefix in linears):
            continue
        if isinstance(module, AdaptedLinear):
            if not module.merged:
                raise RuntimeError(f"layer {name} is not merged; call merge_adapters(model) before exporting")
            origin = MERGED_OFFSETS if isinstance(module.base_layer, GroupwiseIntLinear) else MERGED_DENSE
            linears[name] = _linear_snapshot(name, module.base_layer, origin)
        elif is_base_linear(module):
            if isinstance(module, GroupwiseIntLinear):
                origin = FROZEN_INT
            elif is_nf4_linear(module) or is_torchao_nf4_linear(module):
                origin = FROZEN_NF4
            else:
                origin = FROZEN_DENSE
            linears[name] = _linear_snapshot(name, module, origin)

    others = {}
    for key, tensor in model.state_dict().items():
        if any(key.startswith(prefix + ".") for prefix in linears):
            continue
        others[key] = tensor.detach().cpu()

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.use_cache = True  # training may have turned it off for gradient checkpointing
    return ModelSnapshot(config=config, linears=linears, others=others, merge_how=dict(merge_how or {}))


def _linear_snapshot(name: str, layer: nn.Module, origin: str) -> LinearSnapshot:
    bias = getattr(layer, "bias", None)
    bias = None if bias is None else bias.detach().cpu()
    if isinstance(layer, GroupwiseIntLinear):
        parts = QuantizedParts(
            codes=layer.codes().cpu(),
            scales=layer.scales.detach().cpu(),
            offsets=layer.offsets.detach().cpu(),
            bits=layer.bits,
            group_size=layer.group_size,
        )
        return LinearSnapshot(name, layer.out_features, layer.in_features, origin, quantized=parts, bias=bias)
    weight = dequantized_weight(layer).detach().cpu()
    d_out, d_in = weight.shape
    return LinearSnapshot(name, d_out, d_in, origin, weight=weight, bias=bias)


def requantize_linear(linear: LinearSnapshot, bits: int, group_size: int) -> tuple[QuantizedParts, float]:
    """RTN INT-b quantization of a dense (merged) weight; returns the parts and the relative error."""
    weight = linear.dense_weight()
    dense = nn.Linear(linear.d_in, linear.d_out, bias=False)
    dense.weight.data = weight
    quantized = GroupwiseIntLinear.from_linear(dense, bits=bits, group_size=group_size)
    parts = QuantizedParts(quantized.codes(), quantized.scales, quantized.offsets, bits, group_size)
    error = float((parts.dequantize() - weight).norm() / weight.norm().clamp_min(1e-12))
    return parts, error


def check_finite_tensors(tensors: dict[str, torch.Tensor], what: str = "export") -> None:
    """Raise FloatingPointError naming the first floating tensor holding NaN / inf (``what`` aborted)."""
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise FloatingPointError(f"tensor {key} has {bad} non-finite values; {what} aborted")
