"""Choosing a group's scale and offset: min-max, or a search that minimises the rounding error.

The base format (:mod:`qblora_pl.quantization.int_quantizer`, docs/method.md section 3) stores
``W_hat = scale * q + offset`` per group of ``g`` input features, ``q`` in ``0 .. 2^b - 1``.
Min-max (``offset = min``, ``scale = (max - min) / (2^b - 1)``) spends the code range on the
group's extreme values; at 3 and 2 bits one outlier then costs every other weight of its group
most of its resolution. :func:`mse_group_params` instead searches, per group, for the range
``[lo, hi]`` whose round-to-nearest reconstruction has the smallest squared error:

1. shrink the min-max range about its midpoint by ``p`` in ``1.0, 0.98, ..., 0.5`` (clipping
   both tails, as GPTQ's and llm-compressor's MSE observers do with their shrink grid);
2. slide the best window by ``-0.25 .. +0.25`` of its width (a skewed group wants one tail
   clipped more than the other);
3. refit ``scale`` and ``offset`` by least squares for the chosen codes (the offset is a free
   float in this format, so for fixed codes the best pair is a linear regression), re-round
   the codes, and keep the result where it is better; three times.

Every candidate is scored with its parameters rounded to the storage dtype, so the chosen
codes are the best for the scales and offsets actually stored. A candidate replaces the
current choice only where it is strictly better, so the result is never worse than min-max
(measured on SmolLM2-135M, layers 1 and 15: squared error 0.74x min-max's at INT3 g32,
0.60x at INT2 g32).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["SHRINK_STEPS", "SHIFT_STEPS", "REFITS", "minmax_group_params", "mse_group_params", "round_codes"]

#: Shrink factors of the min-max range tried in step 1 (1.0 = min-max itself).
SHRINK_STEPS = 26
#: Window shifts tried in step 2, from -0.25 to +0.25 of the window's width.
SHIFT_STEPS = 17
#: Least-squares refits in step 3.
REFITS = 3
_SMALLEST_SHRINK = 0.5
_LARGEST_SHIFT = 0.25
#: Rows searched at once: bounds the transient memory to a few copies of ``rows x d_in`` floats.
_ROW_CHUNK = 1024


def _stored(lo: Tensor, hi: Tensor, max_code: int, param_dtype: torch.dtype | None) -> tuple[Tensor, Tensor]:
    """Scale and offset of the range ``[lo, hi]``, rounded to the storage dtype (float32 values)."""
    return _to_storage((hi - lo) / max_code, lo, param_dtype)


def _to_storage(scale: Tensor, offset: Tensor, param_dtype: torch.dtype | None) -> tuple[Tensor, Tensor]:
    """``scale`` and ``offset`` rounded to the storage dtype (float32 values holding them).

    A zero scale (a constant group) becomes the storage dtype's smallest normal number: the
    codes are then 0 and the group dequantizes to its offset, exactly its value.
    """
    store = param_dtype or torch.float32
    scale, offset = scale.to(store).float(), offset.to(store).float()
    tiny = torch.finfo(store).tiny
    return torch.where(scale > 0, scale, torch.full_like(scale, tiny)), offset


def round_codes(groups: Tensor, scale: Tensor, offset: Tensor, max_code: int) -> Tensor:
    """Round-to-nearest codes of ``groups`` (``..., g``) for per-group ``scale`` / ``offset`` (float32)."""
    return torch.round((groups - offset.unsqueeze(-1)) / scale.unsqueeze(-1)).clamp_(0, max_code)


def minmax_group_params(groups: Tensor, max_code: int, param_dtype: torch.dtype | None) -> tuple[Tensor, Tensor]:
    """Min-max scale and offset over the last dimension, float32 shaped ``groups[..., 0]``."""
    return _stored(groups.amin(dim=-1), groups.amax(dim=-1), max_code, param_dtype)


def _squared_error(groups: Tensor, codes: Tensor, scale: Tensor, offset: Tensor) -> Tensor:
    return (groups - (codes * scale.unsqueeze(-1) + offset.unsqueeze(-1))).square_().sum(dim=-1)


class _Best:
    """The best (error, codes, scale, offset) per group so far; a candidate wins where strictly better."""

    def __init__(self, groups: Tensor, max_code: int, lo: Tensor, hi: Tensor, param_dtype: torch.dtype | None):
        self.groups, self.max_code, self.param_dtype = groups, max_code, param_dtype
        self.scale, self.offset = _stored(lo, hi, max_code, param_dtype)
        self.codes = round_codes(groups, self.scale, self.offset, max_code)
        self.error = _squared_error(groups, self.codes, self.scale, self.offset)
        self.lo, self.hi = lo, hi  # the range the current choice came from (steps 1-2)

    def consider_range(self, lo: Tensor, hi: Tensor) -> None:
        scale, offset = _stored(lo, hi, self.max_code, self.param_dtype)
        better = self._consider(scale, offset)
        self.lo, self.hi = torch.where(better, lo, self.lo), torch.where(better, hi, self.hi)

    def consider_params(self, scale: Tensor, offset: Tensor) -> None:
        self._consider(*_to_storage(scale, offset, self.param_dtype))

    def _consider(self, scale: Tensor, offset: Tensor) -> Tensor:
        codes = round_codes(self.groups, scale, offset, self.max_code)
        error = _squared_error(self.groups, codes, scale, offset)
        better = error < self.error
        self.error = torch.where(better, error, self.error)
        self.codes = torch.where(better.unsqueeze(-1), codes, self.codes)
        self.scale = torch.where(better, scale, self.scale)
        self.offset = torch.where(better, offset, self.offset)
        return better


def _search(groups: Tensor, max_code: int, param_dtype: torch.dtype | None) -> tuple[Tensor, Tensor]:
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
    best = _Best(groups, max_code, lo, hi, param_dtype)
    middle = (lo + hi) / 2
    for shrink in torch.linspace(1.0, _SMALLEST_SHRINK, SHRINK_STEPS)[1:].tolist():
        best.consider_range(middle - shrink * (middle - lo), middle + shrink * (hi - middle))
    lo, hi = best.lo, best.hi
    width = hi - lo
    for shift in torch.linspace(-_LARGEST_SHIFT, _LARGEST_SHIFT, SHIFT_STEPS).tolist():
        if shift != 0.0:
            best.consider_range(lo + shift * width, hi + shift * width)
    n = groups.shape[-1]
    for _ in range(REFITS):
        codes = best.codes
        sum_q, sum_qq = codes.sum(-1), codes.square().sum(-1)
        sum_w, sum_qw = groups.sum(-1), (codes * groups).sum(-1)
        det = n * sum_qq - sum_q * sum_q
        scale = torch.where(det > 0, (n * sum_qw - sum_q * sum_w) / det.clamp_min(1e-30), best.scale)
        best.consider_params(scale, (sum_w - scale * sum_q) / n)
    return best.scale, best.offset


@torch.no_grad()
def mse_group_params(groups: Tensor, max_code: int, param_dtype: torch.dtype | None) -> tuple[Tensor, Tensor]:
    """Per-group scale and offset minimising the squared rounding error (module docstring).

    ``groups`` is ``(..., g)`` float32; returns float32 ``scale`` and ``offset`` shaped
    ``groups[..., 0]``, holding values exactly representable in ``param_dtype``. Deterministic.
    """
    groups = groups.float()
    if groups.dim() < 2 or groups.shape[0] <= _ROW_CHUNK:
        return _search(groups, max_code, param_dtype)
    parts = [_search(chunk, max_code, param_dtype) for chunk in groups.split(_ROW_CHUNK)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
