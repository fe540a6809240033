"""Group-wise asymmetric integer quantization of the frozen base (docs/method.md section 3).

Every row of a weight ``W`` (``d_out x d_in``) is cut into groups of ``g`` consecutive
input features. Group ``G`` of row ``o`` gets one ``scale`` and one ``offset``; each weight
keeps a ``b``-bit code ``q`` in ``0 .. 2^b - 1`` and is reconstructed as

    W_hat[o, j] = scale[o, G(j)] * q[o, j] + offset[o, G(j)]

the same form as GGUF Q4_1 / Q5_1 (``w = d * q + m``). The offsets are floats, which is
what lets QA-LoRA / QA-BLoRA fold a group-constant update into them exactly (docs/method.md
sections 3 and 4).

:class:`GroupwiseIntQuantizer` is the arithmetic: min-max round-to-nearest (and an optional
GPTQ-calibrated variant), the one dequantization formula, and a straight-through fake
quantizer for QAT (docs/method.md section 5). The frozen layer that stores its codes is
:class:`~qblora_pl.quantization.int_layer.GroupwiseIntLinear`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from qblora_pl.quantization.group_search import minmax_group_params, mse_group_params, round_codes
from qblora_pl.quantization.packing import SUPPORTED_BITS

__all__ = ["SUPPORTED_GROUP_SIZES", "GroupwiseIntQuantizer"]

SUPPORTED_GROUP_SIZES: tuple[int, ...] = (32, 64, 128)
#: How a group's scale and offset are chosen (GroupwiseIntQuantizer.group_params).
GROUP_PARAMS: tuple[str, ...] = ("minmax", "mse")


class _StraightThrough(torch.autograd.Function):
    """Forward returns the fake-quantized weight, backward passes the gradient unchanged."""

    @staticmethod
    def forward(ctx: Any, weight: Tensor, fake: Tensor) -> Tensor:  # noqa: ARG004
        return fake

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # noqa: ARG004
        return grad, None


class GroupwiseIntQuantizer:
    """Asymmetric ``bits``-bit quantizer with one scale and offset per ``group_size`` inputs.

    Implements the base format of docs/method.md section 3. ``quantize`` and ``dequantize`` are
    the only places the format's arithmetic lives; :class:`GroupwiseIntLinear`, the QA-*
    merges and the exporters all go through them.
    """

    def __init__(self, bits: int = 4, group_size: int = 32, packable: bool = True) -> None:
        """``packable=False`` admits any width in 2..8 for arithmetic only (fake quantization
        during bit annealing, e.g. 6 bits); stored, bit-packed codes need ``SUPPORTED_BITS``."""
        allowed = SUPPORTED_BITS if packable else tuple(range(2, 9))
        if bits not in allowed:
            raise ValueError(f"bits={bits} is not supported; allowed: {allowed}")
        if group_size not in SUPPORTED_GROUP_SIZES:
            raise ValueError(
                f"group_size={group_size} is not supported; allowed: {SUPPORTED_GROUP_SIZES}"
            )
        self.bits = bits
        self.group_size = group_size

    @property
    def max_code(self) -> int:
        """Largest code, ``2^bits - 1``."""
        return (1 << self.bits) - 1

    def __repr__(self) -> str:
        return f"{type(self).__name__}(bits={self.bits}, group_size={self.group_size})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, GroupwiseIntQuantizer):
            return NotImplemented
        return (self.bits, self.group_size) == (other.bits, other.group_size)

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.bits, self.group_size))

    # ------------------------------------------------------------------ helpers
    def num_groups(self, d_in: int) -> int:
        """Number of quantization groups per row; raises if ``d_in`` is not divisible."""
        if d_in % self.group_size != 0:
            raise ValueError(
                f"d_in={d_in} is not divisible by group_size={self.group_size}"
            )
        return d_in // self.group_size

    def _check_weight(self, weight: Tensor) -> None:
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D (d_out, d_in), got shape {tuple(weight.shape)}")
        self.num_groups(weight.shape[1])
        if not weight.is_floating_point():
            raise ValueError(f"weight must be floating point, got {weight.dtype}")
        if not bool(torch.isfinite(weight).all()):
            raise ValueError("weight contains non-finite values (inf or nan); cannot quantize")

    def group_params(
        self, groups: Tensor, param_dtype: torch.dtype | None, params: str = "minmax"
    ) -> tuple[Tensor, Tensor]:
        """Scale and offset per group (last dimension of ``groups``), float32 shaped ``groups[..., 0]``.

        ``params="minmax"``: the group's min-max range; ``"mse"``: the range searched for the
        smallest squared rounding error (:mod:`qblora_pl.quantization.group_search`). With
        ``param_dtype`` the parameters are rounded to it first (returned as float32 holding the
        rounded values), so the codes are chosen for the parameters that will actually be stored.
        """
        if params == "minmax":
            return minmax_group_params(groups, self.max_code, param_dtype)
        if params == "mse":
            return mse_group_params(groups, self.max_code, param_dtype)
        raise ValueError(f"params={params!r} must be one of {list(GROUP_PARAMS)}")

    def _codes(self, groups: Tensor, scale: Tensor, offset: Tensor) -> Tensor:
        return round_codes(groups, scale, offset, self.max_code).to(torch.uint8)

    # ------------------------------------------------------------------ public API
    def quantize(
        self, weight: Tensor, param_dtype: torch.dtype | None = None, params: str = "minmax"
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Round-to-nearest quantization of ``weight`` (``d_out x d_in``).

        Per group (docs/method.md section 3), with the default min-max ``params``: ``offset = min``,
        ``scale = (max - min) / (2^b - 1)``, ``q = clamp(round((w - offset) / scale), 0, 2^b - 1)``;
        ``params="mse"`` searches the group's range for the smallest squared error instead
        (:meth:`group_params`). ``param_dtype`` (e.g. ``torch.float16``) rounds scales and
        offsets to the dtype they will be stored in before the codes are chosen.

        Returns ``codes`` (``uint8``, ``d_out x d_in``), ``scales`` and ``offsets``
        (float32, ``d_out x d_in / g``).
        """
        self._check_weight(weight)
        d_out, d_in = weight.shape
        groups = weight.detach().float().reshape(d_out, self.num_groups(d_in), self.group_size)
        scale, offset = self.group_params(groups, param_dtype, params)
        codes = self._codes(groups, scale, offset).reshape(d_out, d_in)
        return codes, scale, offset

    def dequantize(self, codes: Tensor, scales: Tensor, offsets: Tensor) -> Tensor:
        """The format's one formula: ``W_hat = scale[G(j)] * q + offset[G(j)]`` in float32.

        ``codes`` is ``(..., d_in)`` (any integer dtype); ``scales`` and ``offsets`` are
        ``(..., d_in / g)`` of any float dtype (a merged QA-* layer carries float32
        offsets, docs/method.md sections 3-4). Always computes and returns float32.
        """
        d_in = codes.shape[-1]
        n_groups = self.num_groups(d_in)
        expected = (*codes.shape[:-1], n_groups)
        for name, t in (("scales", scales), ("offsets", offsets)):
            if tuple(t.shape) != expected:
                raise ValueError(
                    f"{name} have shape {tuple(t.shape)}, expected {expected} for codes of "
                    f"shape {tuple(codes.shape)} and group_size={self.group_size}"
                )
        scales = scales.float().unsqueeze(-1)
        offsets = offsets.float().unsqueeze(-1)
        if torch.is_grad_enabled() and (scales.requires_grad or offsets.requires_grad):
            w = codes.float().reshape(*expected, self.group_size) * scales + offsets
        else:
            # Same two roundings (a product, then a sum; no fused multiply-add), in place on one
            # fresh float32 buffer instead of three: bit-identical, about 2x faster on CPU.
            w = codes.to(torch.float32, copy=True).reshape(*expected, self.group_size)
            w.mul_(scales).add_(offsets)
        return w.reshape(codes.shape)

    def integer_zero_points(self, scales: Tensor, offsets: Tensor) -> tuple[Tensor, Tensor]:
        """The integer zero points ``z = round(-offset / scale)`` in ``0 .. 2^b - 1`` (float32) and the
        offsets they stand for, ``-scale * z``: the form ``W = scale * (q - z)`` of GPTQ, AWQ and
        compressed-tensors. One rounding for QAT's ``zero_point: integer`` and the exports that store it."""
        scales = scales.float()
        zero = torch.round(-offsets.float() / scales).clamp(0, self.max_code)
        return zero, -scales * zero

    def fake_quantize(self, weight: Tensor, param_dtype: torch.dtype | None = None) -> Tensor:
        """Quantize-dequantize with a straight-through estimator (docs/method.md section 5).

        Forward returns exactly ``dequantize(*quantize(weight, param_dtype))`` cast to
        ``weight.dtype``; backward treats the rounding as the identity, so the gradient
        reaches ``weight`` unchanged. Used for QAT of the merged weight; pass the storage
        dtype of the export (``GroupwiseIntLinear.from_linear``'s ``scale_dtype``) so that
        training sees exactly the weights the export will write.
        """
        with torch.no_grad():
            fake = self.dequantize(*self.quantize(weight, param_dtype)).to(weight.dtype)
        return _StraightThrough.apply(weight, fake)

    @torch.no_grad()
    def quantize_gptq(
        self,
        weight: Tensor,
        hessian_inputs: Tensor | Iterable[Tensor],
        damp: float = 0.01,
        block_size: int = 128,
        param_dtype: torch.dtype | None = None,
        params: str = "minmax",
    ) -> tuple[Tensor, Tensor, Tensor]:
        """GPTQ-calibrated quantization (Frantar et al., 2023) into the same format.

        ``hessian_inputs`` are a few batches of the layer's inputs (each ``(..., d_in)``); they
        define ``H = 2 X^T X / N`` (:class:`~qblora_pl.quantization.gptq.HessianAccumulator`).
        See :func:`qblora_pl.quantization.gptq.gptq_quantize` for the algorithm and the other
        arguments. Returns ``codes``, ``scales``, ``offsets`` exactly as :meth:`quantize`.
        """
        from qblora_pl.quantization.gptq import HessianAccumulator, gptq_quantize

        self._check_weight(weight)
        accumulator = HessianAccumulator(weight.shape[1], device=weight.device)
        for batch in [hessian_inputs] if isinstance(hessian_inputs, Tensor) else hessian_inputs:
            accumulator.add(batch)
        return gptq_quantize(self, weight, accumulator.hessian(), damp=damp, block_size=block_size,
                             param_dtype=param_dtype, params=params)
