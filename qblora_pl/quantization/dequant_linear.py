"""The INT-b base's matmul: dequantize in forward, dequantize again in backward, save no ``W_hat``.

``F.linear(x, layer.dequantize(), bias)`` under autograd keeps the dequantized weight alive from
the forward to the backward (it is what the input gradient ``dL/dx = dL/dy W_hat`` needs), so a
QA-LoRA / QA-BLoRA step would hold every layer's dense weight at once: 64 MiB of float32 for
one 4096 x 4096 INT4 layer whose codes take 8 MiB. :class:`DequantizingLinear` saves the
layer's own packed codes, scales and offsets instead (already resident, or re-gathered by FSDP2
before the layer's backward like any parameter) and rebuilds ``W_hat`` in backward - what
bitsandbytes' ``MatMul4Bit`` and torchao's ``linear_nf4`` do for NF4.

Forward is bit for bit the plain path: the same float32 dequantization formula
(:meth:`GroupwiseIntQuantizer.dequantize`), cast to the input dtype, then ``F.linear``. The
dequantization runs in row blocks of at most :data:`DEQUANT_BLOCK_BYTES` float32 bytes written
into the output buffer, so a 16-bit forward holds the weight once in its dtype plus one float32
block, not the whole layer in float32 and again in 16 bits. Backward multiplies by ``W_hat``
in the same row blocks (accumulating in float32 when there is more than one), so its transient
is one block; a layer of one block takes the plain path's single matmul.

The base's codes and offsets never train. Its group scales may (an adapter's learned scales,
``scale_rank``): then the scales passed in carry a gradient, ``dL/ds[o, G] = sum_{i in G} q[o, i]
(dL/dy^T x)[o, i]``, computed in backward from the same row blocks (one block of ``dL/dW`` at a time,
never the whole layer) and ``x``, which is saved for it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from qblora_pl.quantization.packing import unpack_codes

__all__ = ["DEQUANT_BLOCK_BYTES", "DequantizingLinear", "dequantize_packed", "row_block"]

#: The float32 bytes of ``W_hat`` one dequantization step materialises (forward and backward).
DEQUANT_BLOCK_BYTES = 16 * 2**20


def row_block(out_features: int, in_features: int, block_bytes: int | None = None) -> int:
    """Rows of ``W_hat`` per dequantization block: as many as fit ``block_bytes`` in float32
    (default :data:`DEQUANT_BLOCK_BYTES`), at least one, at most all."""
    budget = DEQUANT_BLOCK_BYTES if block_bytes is None else block_bytes
    return max(1, min(out_features, budget // (4 * in_features)))


def _dequantize_rows(quantizer: Any, packed: Tensor, scales: Tensor, offsets: Tensor, in_features: int) -> Tensor:
    bits = quantizer.bits
    differentiable = torch.is_grad_enabled() and (scales.requires_grad or offsets.requires_grad)
    if bits not in (2, 4) or differentiable or packed.dim() != 2:
        return quantizer.dequantize(unpack_codes(packed, bits, in_features), scales, offsets)
    # 2 / 4 bits: each byte's fields are written straight into the float32 buffer (no uint8 codes
    # tensor, no separate conversion), then the same in-place product and sum as
    # GroupwiseIntQuantizer.dequantize: bit-identical, about 1.3x faster on CPU.
    rows, per_byte, mask = packed.shape[0], 8 // bits, (1 << bits) - 1
    n_groups = quantizer.num_groups(in_features)
    if packed.shape[1] * per_byte != in_features or tuple(scales.shape) != (rows, n_groups) or tuple(offsets.shape) != (rows, n_groups):
        return quantizer.dequantize(unpack_codes(packed, bits, in_features), scales, offsets)  # its errors name the shapes
    weight = torch.empty(rows, packed.shape[1], per_byte, dtype=torch.float32, device=packed.device)
    for k in range(per_byte):
        field = packed >> (bits * k) if k else packed
        weight[..., k] = field & mask if k < per_byte - 1 else field
    weight = weight.view(rows, n_groups, quantizer.group_size)
    weight.mul_(scales.float().unsqueeze(-1)).add_(offsets.float().unsqueeze(-1))
    return weight.view(rows, in_features)


def dequantize_packed(
    quantizer: Any,
    packed: Tensor,
    scales: Tensor,
    offsets: Tensor,
    in_features: int,
    dtype: torch.dtype,
    block_bytes: int | None = None,
) -> Tensor:
    """``W_hat`` in ``dtype``, dequantized in float32 row blocks written into one output buffer.

    Bit-identical to ``quantizer.dequantize(unpack_codes(packed), scales, offsets).to(dtype)``:
    every element goes through the same float32 product, sum and one cast.
    """
    out_features = packed.shape[0]
    rows = row_block(out_features, in_features, block_bytes)
    if rows >= out_features:
        return _dequantize_rows(quantizer, packed, scales, offsets, in_features).to(dtype)
    weight = torch.empty(out_features, in_features, dtype=dtype, device=packed.device)
    for start in range(0, out_features, rows):
        stop = min(start + rows, out_features)
        weight[start:stop] = _dequantize_rows(
            quantizer, packed[start:stop], scales[start:stop], offsets[start:stop], in_features
        )
    return weight


class DequantizingLinear(torch.autograd.Function):
    """``y = x W_hat^T + b`` that saves ``(packed codes, scales, offsets)`` for backward, not ``W_hat``.

    ``apply(x, packed, scales, offsets, bias, quantizer, in_features[, offset_delta])``. ``x`` gets a
    gradient, and ``scales`` when they require one (learned scales); codes, offsets and the bias
    are frozen. ``offset_delta`` (``(d_out, d_in / g)``, a QA-* adapter's group-constant update)
    is added to the offsets in float32 exactly as a merge adds it, so ``y`` is the merged layer's
    output, and gets its gradient from the per-group sums of ``x``: the adapter costs no separate
    matmul or broadcast add over the output.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        packed: Tensor,
        scales: Tensor,
        offsets: Tensor,
        bias: Tensor | None,
        quantizer: Any,
        in_features: int,
        offset_delta: Tensor | None = None,
    ) -> Tensor:
        if offset_delta is not None:  # exactly the offsets AdaptedLinear.merge() writes
            offsets = offsets.float() + offset_delta.float()
        weight = dequantize_packed(quantizer, packed, scales, offsets, in_features, x.dtype)
        ctx.learns_scales = bool(ctx.needs_input_grad[2])
        ctx.learns_offsets = offset_delta is not None and bool(ctx.needs_input_grad[7])
        # dL/d(offset[o, G]) = sum_{i in G} (dL/dy^T x)[o, i] = (dL/dy^T X_G)[o, G]: only the
        # per-group sums of x are needed, (tokens, d_in / g) in float32, not x itself.
        group_sums = (_group_sums(x, in_features, quantizer.group_size),) if ctx.learns_offsets else ()
        ctx.save_for_backward(packed, scales, offsets, *((x,) if ctx.learns_scales else ()), *group_sums)
        ctx.quantizer = quantizer
        ctx.in_features = in_features
        ctx.offset_dtype = None if offset_delta is None else offset_delta.dtype
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor):
        packed, scales, offsets, *rest = ctx.saved_tensors
        saved_x = rest[0] if ctx.learns_scales else None
        quantizer, in_features = ctx.quantizer, ctx.in_features
        grad_x = _input_grad(quantizer, packed, scales, offsets, in_features, grad_out) if ctx.needs_input_grad[0] else None
        grad_scales = _scale_grad(quantizer, packed, in_features, grad_out, saved_x).to(scales.dtype) \
            if ctx.learns_scales else None
        grad_offsets = None
        if ctx.learns_offsets:
            grad_2d = grad_out.reshape(-1, packed.shape[0]).float()
            grad_offsets = (grad_2d.T @ rest[-1]).to(ctx.offset_dtype)
        return grad_x, None, grad_scales, None, None, None, None, grad_offsets


def _group_sums(x: Tensor, in_features: int, group_size: int) -> Tensor:
    """``X_G[t, G] = sum_{i in G} x[t, i]`` in float32: ``(tokens, d_in / group_size)``."""
    return x.reshape(-1, in_features // group_size, group_size).sum(-1, dtype=torch.float32)


def _input_grad(quantizer: Any, packed: Tensor, scales: Tensor, offsets: Tensor, in_features: int,
                grad_out: Tensor) -> Tensor:
    """``dL/dx = dL/dy W_hat``, ``W_hat`` rebuilt in row blocks (one matmul for a layer of one block)."""
    out_features = packed.shape[0]
    rows = row_block(out_features, in_features)
    if rows >= out_features:
        return grad_out.matmul(_dequantize_rows(quantizer, packed, scales, offsets, in_features).to(grad_out.dtype))
    grad_2d = grad_out.reshape(-1, out_features)
    grad_x = torch.zeros(grad_2d.shape[0], in_features, dtype=torch.float32, device=grad_out.device)
    for start in range(0, out_features, rows):
        stop = min(start + rows, out_features)
        block = _dequantize_rows(quantizer, packed[start:stop], scales[start:stop], offsets[start:stop], in_features)
        grad_x.addmm_(grad_2d[:, start:stop].float(), block)
    return grad_x.to(grad_out.dtype).reshape(*grad_out.shape[:-1], in_features)


def _scale_grad(quantizer: Any, packed: Tensor, in_features: int, grad_out: Tensor, x: Tensor) -> Tensor:
    """``dL/ds[o, G] = sum_{i in G} q[o, i] (dL/dy^T x)[o, i]`` in float32, one row block of ``dL/dW`` at a time."""
    out_features = packed.shape[0]
    grad_2d = grad_out.reshape(-1, out_features).float()
    x_2d = x.reshape(-1, in_features).float()
    n_groups, group_size = quantizer.num_groups(in_features), quantizer.group_size
    grad_scales = torch.empty(out_features, n_groups, dtype=torch.float32, device=grad_out.device)
    rows = row_block(out_features, in_features)
    for start in range(0, out_features, rows):
        stop = min(start + rows, out_features)
        grad_weight = grad_2d[:, start:stop].T @ x_2d  # (rows, d_in): this block of dL/dW
        codes = unpack_codes(packed[start:stop], quantizer.bits, in_features).float()
        grad_scales[start:stop] = (grad_weight * codes).view(stop - start, n_groups, group_size).sum(-1)
    return grad_scales
