"""Model-level merges: fold every adapter into the model, exactly or by re-quantization.

* :func:`merge_adapters` / :func:`unmerge_adapters` call each :class:`AdaptedLinear`'s merge.
  For QA-LoRA / QA-BLoRA on a group-wise INT-b base this is exact and stays b-bit; for LoRA /
  Q-BLoRA it produces a dense (16/32-bit) merged layer, exact too.
* :func:`requantize_merged` turns a merged dense model into an INT-b one by round-to-nearest
  re-quantization of ``W_hat + dW`` - the lossy deployment path of QLoRA / Q-BLoRA that the
  QA-* methods are measured against (docs/method.md section 5).
"""

from __future__ import annotations

from contextlib import contextmanager
from collections.abc import Iterator

import torch
from torch import nn

from qblora_pl.adapters.injection import adapted_layers
from qblora_pl.quantization.int_layer import GroupwiseIntLinear


def merge_adapters(model: nn.Module, dense_dtype: torch.dtype = torch.float32) -> dict[str, str]:
    """Merge every adapter in place; returns ``{layer: "offsets" | "dense"}`` (how it merged)."""
    how = {}
    for name, layer in adapted_layers(model).items():
        how[name] = "offsets" if layer.merges_into_offsets else "dense"
        layer.merge(name=name, dense_dtype=dense_dtype)
    return how


def unmerge_adapters(model: nn.Module) -> None:
    for layer in adapted_layers(model).values():
        layer.unmerge()


@contextmanager
def merged(model: nn.Module, dense_dtype: torch.dtype = torch.float32) -> Iterator[nn.Module]:
    """Run a block with the adapters merged, restoring the unmerged model afterwards."""
    merge_adapters(model, dense_dtype)
    try:
        yield model
    finally:
        unmerge_adapters(model)


@torch.no_grad()
def requantize_merged(model: nn.Module, bits: int, group_size: int, scale_dtype: torch.dtype = torch.float16) -> dict[str, float]:
    """Replace each merged dense adapted layer's base by an RTN INT-b quantization of it.

    Call after :func:`merge_adapters`. Layers already merged into INT-b offsets are left as
    they are (they are exact). Returns each re-quantized layer's relative weight error
    ``||Q(W) - W||_F / ||W||_F``; ``unmerge_adapters`` still restores the original model.
    """
    errors = {}
    for name, layer in adapted_layers(model).items():
        if not layer.merged:
            raise RuntimeError(f"layer {name} is not merged; call merge_adapters(model) first")
        if isinstance(layer.base_layer, GroupwiseIntLinear):
            continue
        dense: nn.Linear = layer.base_layer  # type: ignore[assignment]
        quantized = GroupwiseIntLinear.from_linear(dense.float(), bits=bits, group_size=group_size, scale_dtype=scale_dtype)
        weight = dense.weight.float()
        errors[name] = float((quantized.dequantize(torch.float32) - weight).norm() / weight.norm().clamp_min(1e-12))
        layer.base_layer = quantized
    return errors

