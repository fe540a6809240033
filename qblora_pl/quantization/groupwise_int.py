"""Group-wise asymmetric integer quantization of the frozen base (METHOD.md section 3).

Every row of a weight ``W`` (``d_out x d_in``) is cut into groups of ``g`` consecutive
input features. Group ``G`` of row ``o`` gets one ``scale`` and one ``offset``; each weight
keeps a ``b``-bit code ``q`` in ``0 .. 2^b - 1`` and is reconstructed as

    W_hat[o, j] = scale[o, G(j)] * q[o, j] + offset[o, G(j)]

the same form as GGUF Q4_1 / Q5_1 (``w = d * q + m``). The offsets are floats, which is
what lets QA-LoRA / QA-BLoRA fold a group-constant update into them exactly (METHOD.md
sections 3 and 4).

Three pieces:

- :class:`GroupwiseIntQuantizer` - the arithmetic: min-max round-to-nearest (and an
  optional GPTQ-calibrated variant), the one dequantization formula, and a
  straight-through fake quantizer for QAT (METHOD.md section 5).
- :class:`GroupwiseIntLinear` - the frozen quantized base layer: bit-packed codes,
  scales and offsets as buffers, dequantized on the fly in ``forward``. Adapter strategies
  wrap it; they never copy it.
- :func:`quantize_linear_layers` - swaps a model's target ``nn.Linear`` layers for
  :class:`GroupwiseIntLinear` in place.

Opt-in fast inference (INT4 only): :meth:`GroupwiseIntLinear.use_int4_kernel` /
:func:`enable_int4_inference` route the no-grad forward through torch's weight-only INT4
kernels (``aten._weight_int4pack_mm_for_cpu`` on CPU, ``aten._weight_int4pack_mm`` on CUDA)
instead of dequantizing the whole weight per call. Those kernels compute in bfloat16, so this
path is *not* bit-exact (about 4e-3 relative output error); training, merges, exports and the
default forward keep the exact float32 dequantize path.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qblora_pl.quantization.dequant_linear import DequantizingLinear, dequantize_packed
from qblora_pl.quantization.group_search import minmax_group_params, mse_group_params, round_codes
from qblora_pl.quantization.packing import SUPPORTED_BITS, pack_codes, unpack_codes

__all__ = [
    "SUPPORTED_BITS",
    "SUPPORTED_GROUP_SIZES",
    "GroupwiseIntQuantizer",
    "GroupwiseIntLinear",
    "INT4_KERNEL_GROUP_SIZES",
    "Int4KernelFallbackWarning",
    "dequantized_weight_cache",
    "enable_int4_inference",
    "quantize_linear_layers",
]

SUPPORTED_GROUP_SIZES: tuple[int, ...] = (32, 64, 128)
#: How a group's scale and offset are chosen (GroupwiseIntQuantizer.group_params).
GROUP_PARAMS: tuple[str, ...] = ("minmax", "mse")

#: Group sizes torch's INT4 weight-only kernels accept (every ``SUPPORTED_GROUP_SIZES`` entry is one).
INT4_KERNEL_GROUP_SIZES: tuple[int, ...] = (32, 64, 128, 256)
#: Activation dtypes the fast path accepts (they are cast to bfloat16 for the kernel and back).
_INT4_KERNEL_INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class Int4KernelFallbackWarning(UserWarning):
    """A layer with the INT4 kernel enabled ran (or was left on) the exact dequantize path."""


_INT4_WARNED: set[str] = set()  # fallback reasons already warned about (one warning per reason)


def _warn_int4_fallback_once(reason: str) -> None:
    if reason in _INT4_WARNED:
        return
    _INT4_WARNED.add(reason)
    warnings.warn(
        f"GroupwiseIntLinear: INT4 kernel not used, exact dequantize path instead: {reason} "
        f"(warned once per reason)",
        Int4KernelFallbackWarning,
        stacklevel=3,
    )


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

    Implements the base format of METHOD.md section 3. ``quantize`` and ``dequantize`` are
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

        Per group (METHOD.md section 3), with the default min-max ``params``: ``offset = min``,
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
        offsets, METHOD.md sections 3-4). Always computes and returns float32.
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
        """Quantize-dequantize with a straight-through estimator (METHOD.md section 5).

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


class GroupwiseIntLinear(nn.Module):
    """Frozen linear layer whose weight is stored group-wise quantized (METHOD.md section 3).

    Frozen parameters (``requires_grad=False``; nothing here trains):

    - ``packed_codes``: ``uint8`` ``(d_out, d_in * bits / 8)``, bit-packed codes.
    - ``scales``, ``offsets``: ``(d_out, d_in / group_size)`` in ``scale_dtype``.
    - ``bias`` (optional): ``(d_out,)`` float32 (lossless for fp16 / bf16 / fp32 biases).

    They are parameters rather than buffers so that FSDP2 (``fully_shard``, which shards
    parameters and replicates buffers) shards the frozen base across ranks; FSDP2 all-gathers a
    group of mixed dtypes through one byte buffer, so the packed ``uint8`` codes need no float
    view (docs/fsdp.md). State-dict keys are the same as for buffers. Assigning a plain tensor
    (``layer.offsets = merged``) wraps it in a frozen parameter.

    :meth:`dequantize` is the single code path that produces ``W_hat`` - for the training
    forward and for merges and exports alike. A QA-* merge may replace ``self.offsets`` with
    a float32 tensor (offsets + folded update); ``dequantize`` accepts any float dtype.

    ``module.to(dtype)`` / ``.half()`` move these tensors between devices but never change
    the dtype of ``scales``, ``offsets`` or ``bias``: a precision plugin casting the model
    must not round the quantization parameters (fp16 -> bf16 would lose three mantissa bits).

    Memory per weight: ``(bits + 2 * 16 / group_size) / 8`` bytes with fp16 scales/offsets.
    """

    _QUANT_TENSORS = ("packed_codes", "scales", "offsets", "bias")
    _QUANT_FLOAT_TENSORS = ("scales", "offsets", "bias")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int = 4,
        group_size: int = 32,
        bias: bool = False,
        scale_dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
    ) -> None:
        """Allocate zeroed buffers of the right shapes, e.g. for a model skeleton to load into."""
        super().__init__()
        self.quantizer = GroupwiseIntQuantizer(bits, group_size)
        if in_features <= 0 or out_features <= 0:
            raise ValueError(
                f"in_features={in_features} and out_features={out_features} must be positive"
            )
        n_groups = self.quantizer.num_groups(in_features)
        if not scale_dtype.is_floating_point:
            raise ValueError(f"scale_dtype must be a floating dtype, got {scale_dtype}")
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        self.scale_dtype = scale_dtype
        self._int4_kernel = False  # opt-in fast inference path (use_int4_kernel)
        self._int4_cache: tuple | None = None  # (key, packed weight, scales_and_zeros)
        self._cache_dense = False  # opt-in: keep W_hat between forwards (cache_dequantized_weight)
        self._dense_cache: tuple | None = None  # (key, W_hat)
        self.packed_codes = torch.zeros(out_features, in_features * bits // 8, dtype=torch.uint8, device=device)
        self.scales = torch.zeros(out_features, n_groups, dtype=scale_dtype, device=device)
        self.offsets = torch.zeros(out_features, n_groups, dtype=scale_dtype, device=device)
        self.bias = torch.zeros(out_features, dtype=torch.float32, device=device) if bias else None

    def __setattr__(self, name: str, value: Any) -> None:
        # The quantized storage is always a frozen parameter (see the class docstring), also when
        # a merge, a loader or a test assigns a plain tensor to it.
        if name in self._QUANT_TENSORS and isinstance(value, Tensor) and not isinstance(value, nn.Parameter):
            value = nn.Parameter(value, requires_grad=False)
        elif name in self._QUANT_TENSORS and value is None:
            self._parameters[name] = None
            self.__dict__["_int4_cache"] = self.__dict__["_dense_cache"] = None
            return
        if name in self._QUANT_TENSORS:
            self.__dict__["_int4_cache"] = None  # e.g. a QA-* merge replacing the offsets
            self.__dict__["_dense_cache"] = None
        super().__setattr__(name, value)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        bits: int = 4,
        group_size: int = 32,
        scale_dtype: torch.dtype = torch.float16,
        calibration_inputs: Tensor | Iterable[Tensor] | None = None,
        params: str = "minmax",
    ) -> GroupwiseIntLinear:
        """Quantize ``linear.weight`` into a new frozen layer on the weight's device.

        Round-to-nearest by default; with ``calibration_inputs`` (batches of the layer's
        inputs) GPTQ is used instead (:meth:`GroupwiseIntQuantizer.quantize_gptq`). ``params``
        chooses each group's scale and offset (``"minmax"`` or ``"mse"``). Scales and offsets
        are rounded to ``scale_dtype`` before the codes are chosen. The bias is copied (as
        float32).
        """
        quantizer = GroupwiseIntQuantizer(bits, group_size)
        with torch.no_grad():
            if calibration_inputs is None:
                quantized = quantizer.quantize(linear.weight, param_dtype=scale_dtype, params=params)
            else:
                quantized = quantizer.quantize_gptq(linear.weight, calibration_inputs, param_dtype=scale_dtype,
                                                    params=params)
        return cls.from_quantized(linear, quantized, bits, group_size, scale_dtype)

    @classmethod
    def from_quantized(
        cls,
        linear: nn.Linear,
        quantized: tuple[Tensor, Tensor, Tensor],
        bits: int,
        group_size: int,
        scale_dtype: torch.dtype = torch.float16,
    ) -> GroupwiseIntLinear:
        """A frozen layer holding ``quantized = (codes, scales, offsets)`` of ``linear``'s weight
        (from :meth:`GroupwiseIntQuantizer.quantize` or GPTQ), with ``linear``'s bias, on its device."""
        weight = linear.weight
        layer = cls(
            linear.in_features,
            linear.out_features,
            bits=bits,
            group_size=group_size,
            bias=linear.bias is not None,
            scale_dtype=scale_dtype,
            device=weight.device,
        )
        codes, scales, offsets = quantized
        with torch.no_grad():
            layer.packed_codes.copy_(pack_codes(codes, bits))
            layer.scales.copy_(scales)
            layer.offsets.copy_(offsets)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias.detach())
        return layer

    @property
    def weight_shape(self) -> tuple[int, int]:
        """``(out_features, in_features)`` - the shape of the dequantized weight."""
        return (self.out_features, self.in_features)

    def codes(self) -> Tensor:
        """The unpacked ``uint8`` codes, ``(d_out, d_in)``."""
        return unpack_codes(self.packed_codes, self.bits, self.in_features)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """``W_hat`` (``d_out x d_in``) from this layer's codes, scales and offsets.

        The one code path for the training forward, merges and exports (METHOD.md
        sections 3-4). Computed in float32 (in row blocks, dequant_linear.py), then cast to
        ``dtype`` if given.
        """
        return dequantize_packed(
            self.quantizer, self.packed_codes, self.scales, self.offsets, self.in_features, dtype or torch.float32
        )

    def forward(self, x: Tensor) -> Tensor:
        """``y = x W_hat^T + b`` with ``W_hat`` dequantized on the fly in ``x.dtype``.

        With :meth:`use_int4_kernel` enabled and autograd off, torch's INT4 kernel instead
        (bfloat16 compute, not bit-exact; see :meth:`use_int4_kernel`).
        """
        if getattr(self, "_int4_kernel", False):
            reason = self._int4_runtime_reason(x)
            if reason is None:
                return self._int4_forward(x)
            _warn_int4_fallback_once(reason)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if getattr(self, "_cache_dense", False):
            return F.linear(x, self._cached_dequantized(x.dtype), bias)
        trainable = any(t is not None and t.requires_grad for t in (self.scales, self.offsets, self.bias))
        if torch.is_grad_enabled() and not trainable:
            # Saves the packed codes for backward, not W_hat (dequant_linear.py); same forward.
            return DequantizingLinear.apply(
                x, self.packed_codes, self.scales, self.offsets, bias, self.quantizer, self.in_features
            )
        return F.linear(x, self.dequantize(x.dtype), bias)

    # ------------------------------------------------------------------ dequantized-weight cache
    def cache_dequantized_weight(self, enabled: bool = True) -> GroupwiseIntLinear:
        """Keep ``W_hat`` between forwards instead of unpacking it on every call.

        Exact: the weight is this layer's :meth:`dequantize`, computed once and reused until the
        codes, scales or offsets change (in place or by assignment, e.g. a merge) or the layer
        moves, so outputs are bit-identical to the uncached forward. It costs a dense copy of
        the weight (4 bytes a weight in float32), so it is off by default and meant for scoring
        models whose weights fit in memory dense (``dequantized_weight_cache``). The gain is
        what unpacking costs per forward: 1.06x on SmolLM2 INT3 multiple-choice scoring on a
        CPU (``bench/dequant_cache.py``). Returns ``self``.
        """
        self._cache_dense = bool(enabled)
        self._dense_cache = None
        return self

    def _cached_dequantized(self, dtype: torch.dtype) -> Tensor:
        tensors = (self.packed_codes, self.scales, self.offsets)
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return self.dequantize(dtype)  # a differentiable weight is not cached
        key = (*self._int4_cache_key(), dtype)
        cache = self._dense_cache
        if cache is not None and cache[0] == key:
            return cache[1]
        with torch.no_grad():
            weight = self.dequantize(dtype)
        self._dense_cache = (key, weight)
        return weight

    # ------------------------------------------------------------------ INT4 kernel path
    def int4_kernel_unsupported_reason(self, device: torch.device | str | None = None) -> str | None:
        """Why torch's INT4 kernel cannot run this layer on ``device`` (default: where its codes
        are), or ``None`` if it can. Structural reasons only (bits, group size, shape, device,
        torch build); the per-call ones (autograd, input dtype) are checked in ``forward``."""
        device = torch.device(device) if device is not None else self.packed_codes.device
        if self.bits != 4:
            return f"bits={self.bits} (the kernel is INT4 only)"
        if self.group_size not in INT4_KERNEL_GROUP_SIZES:
            return f"group_size={self.group_size} (the kernel takes {INT4_KERNEL_GROUP_SIZES})"
        if device.type == "cpu":
            if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
                return f"torch {torch.__version__} has no aten._weight_int4pack_mm_for_cpu"
            if self.out_features % 16 != 0:
                return f"out_features={self.out_features} is not a multiple of 16 (CPU kernel)"
        elif device.type == "cuda":
            if not hasattr(torch.ops.aten, "_weight_int4pack_mm"):
                return f"torch {torch.__version__} has no aten._weight_int4pack_mm"
            if self.out_features % 8 != 0:
                return f"out_features={self.out_features} is not a multiple of 8 (CUDA kernel)"
            if self.in_features % 32 != 0:
                return f"in_features={self.in_features} is not a multiple of 32 (CUDA kernel)"
            major, _ = torch.cuda.get_device_capability(device)
            if major < 8 and torch.version.hip is None:
                return f"CUDA compute capability {major}.x < 8.0 (the kernel needs sm80+)"
        else:
            return f"device type {device.type!r} (the kernel runs on cpu and cuda)"
        return None

    def use_int4_kernel(self, enabled: bool = True) -> GroupwiseIntLinear:
        """Opt in to (or out of) torch's weight-only INT4 kernel for inference forwards.

        When enabled, ``forward`` under ``torch.no_grad()`` / ``torch.inference_mode()`` calls
        ``aten._weight_int4pack_mm_for_cpu`` (CPU) or ``aten._weight_int4pack_mm`` (CUDA)
        instead of dequantizing the weight. The kernels compute ``(q - 8) * s + z`` with
        ``s = scale`` and ``z = offset + 8 * scale`` - exactly ``scale * q + offset`` - but with
        bfloat16 activations, scales and zeros (float32 accumulation), so outputs are within
        about 4e-3 relative of the exact path, not bit-equal. The input is cast to bfloat16 and
        the output back to the input's dtype. The kernel's packed weight and
        ``scales_and_zeros`` are built on the first call and cached (about as much memory
        again as the packed codes), rebuilt when the codes, scales or offsets change (a merge,
        ``load_state_dict``, a device move).

        With autograd enabled, or an input dtype other than float32 / float16 / bfloat16,
        ``forward`` takes the exact path and warns once per reason
        (:class:`Int4KernelFallbackWarning`): training is never affected. Raises
        ``ValueError`` naming the reason if the layer cannot use the kernel at all
        (:meth:`int4_kernel_unsupported_reason`). Returns ``self``.
        """
        if enabled:
            reason = self.int4_kernel_unsupported_reason()
            if reason is not None:
                raise ValueError(f"{self.extra_repr()}: cannot use the INT4 kernel: {reason}")
        self._int4_kernel = bool(enabled)
        self._int4_cache = None
        return self

    @property
    def int4_kernel_enabled(self) -> bool:
        return getattr(self, "_int4_kernel", False)

    def _int4_runtime_reason(self, x: Tensor) -> str | None:
        if torch.is_grad_enabled():
            return "autograd is enabled (the kernel has no backward; run under torch.no_grad() or torch.inference_mode())"
        if x.dtype not in _INT4_KERNEL_INPUT_DTYPES:
            return f"input dtype {x.dtype} (the kernel takes float32 / float16 / bfloat16 inputs, computed in bfloat16)"
        if x.device != self.packed_codes.device:
            return f"input on {x.device}, layer on {self.packed_codes.device}"
        cache = self._int4_cache
        if cache is not None and cache[0][0] == x.device:
            return None  # structurally checked when the cache was built
        return self.int4_kernel_unsupported_reason(x.device)

    def _int4_cache_key(self) -> tuple:
        tensors = (self.packed_codes, self.scales, self.offsets)
        return (self.packed_codes.device, *((t.data_ptr(), t._version, t.dtype) for t in tensors))

    def _int4_packed(self) -> tuple[Tensor, Tensor]:
        """The kernel's packed weight and bfloat16 ``scales_and_zeros``, cached until the
        codes, scales or offsets change (in place or by assignment) or the layer moves."""
        key = self._int4_cache_key()
        cache = self._int4_cache
        if cache is not None and cache[0] == key:
            return cache[1], cache[2]
        with torch.no_grad():
            codes = self.codes()  # uint8 (N, K), 0..15
            if codes.device.type == "cpu":
                packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
            else:
                # CUDA takes (N, K/2) uint8 with the even column in the high nibble.
                nibbles = ((codes[:, 0::2] << 4) | codes[:, 1::2]).contiguous()
                inner_k_tiles = next(t for t in (8, 4, 2) if self.in_features % (t * 16) == 0)
                packed = torch.ops.aten._convert_weight_to_int4pack(nibbles, inner_k_tiles)
            # W = scale * q + offset = (q - 8) * scale + (offset + 8 * scale), in float32 before
            # the one rounding to bfloat16. Shape (K / g, N, 2).
            scales = self.scales.float()
            zeros = self.offsets.float() + 8.0 * scales
            scales_and_zeros = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
        self._int4_cache = (key, packed, scales_and_zeros)
        return packed, scales_and_zeros

    def _int4_forward(self, x: Tensor) -> Tensor:
        packed, scales_and_zeros = self._int4_packed()
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
        if x2.shape[0] == 0:
            y = x2.new_zeros(0, self.out_features)
        elif x2.device.type == "cpu":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, self.group_size, scales_and_zeros)
        else:
            y = torch.ops.aten._weight_int4pack_mm(x2, packed, self.group_size, scales_and_zeros)
        y = y.to(x.dtype).reshape(*lead, self.out_features)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y

    def memory_bytes(self) -> int:
        """Bytes held by the packed codes, scales, offsets and bias."""
        return sum(
            t.numel() * t.element_size()
            for t in (self.packed_codes, self.scales, self.offsets, self.bias)
            if t is not None
        )

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> GroupwiseIntLinear:
        # Let device moves through but keep the storage dtype of the quantization tensors:
        # ``model.to(torch.bfloat16)`` must not round fp16 scales or a merged fp32 offset.
        # Restored through ``.data`` so the parameter objects (which FSDP tracks) stay the same.
        self._int4_cache = self._dense_cache = None
        before = {name: p.data for name in self._QUANT_FLOAT_TENSORS if (p := self._parameters.get(name)) is not None}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._parameters.get(name)
            if new is not None and new.dtype != old.dtype:
                new.data = old.to(device=new.device)
        return self

    def extra_repr(self) -> str:
        text = (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bits={self.bits}, group_size={self.group_size}, bias={self.bias is not None}, "
            f"scale_dtype={self.scale_dtype}"
        )
        return text + (", int4_kernel=True" if self.int4_kernel_enabled else "")


def enable_int4_inference(model: nn.Module, enabled: bool = True) -> list[str]:
    """Switch every eligible :class:`GroupwiseIntLinear` of ``model`` to torch's INT4 kernel.

    See :meth:`GroupwiseIntLinear.use_int4_kernel`: inference forwards (autograd off) then run
    in bfloat16 through the kernel - fast, not bit-exact; training keeps the exact path.
    Layers the kernel cannot run (not 4-bit, an ``out_features`` the kernel cannot tile, an
    unsupported device) stay on the exact path, named in one :class:`Int4KernelFallbackWarning`.
    ``enabled=False`` switches every layer back. Returns the qualified names of the layers
    switched (on or off).
    """
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, GroupwiseIntLinear)]
    if not enabled:
        for _, layer in layers:
            layer.use_int4_kernel(False)
        return [n for n, _ in layers]
    switched, skipped = [], {}
    for name, layer in layers:
        reason = layer.int4_kernel_unsupported_reason()
        if reason is None:
            layer.use_int4_kernel(True)
            switched.append(name)
        else:
            skipped[name] = reason
    if skipped:
        listed = "; ".join(f"{n}: {r}" for n, r in list(skipped.items())[:8])
        more = f" (+{len(skipped) - 8} more)" if len(skipped) > 8 else ""
        warnings.warn(
            f"enable_int4_inference: {len(skipped)} of {len(layers)} GroupwiseIntLinear layer(s) "
            f"stay on the exact dequantize path: {listed}{more}",
            Int4KernelFallbackWarning,
            stacklevel=2,
        )
    return switched


def quantize_linear_layers(
    model: nn.Module,
    target_names: Iterable[str] | Callable[[str], bool],
    bits: int = 4,
    group_size: int = 32,
    scale_dtype: torch.dtype = torch.float16,
    params: str = "minmax",
    progress: bool = False,
) -> list[str]:
    """Replace target ``nn.Linear`` layers of ``model`` in place with :class:`GroupwiseIntLinear`.

    Builds the frozen low-bit base of METHOD.md section 3. ``target_names`` is either a
    collection of last name components (``{"q_proj", "down_proj"}``) or a predicate on the
    fully qualified module name. All matched layers are checked before any is replaced, so
    a shape error leaves the model untouched.

    Returns the qualified names of the replaced layers. Raises ``ValueError`` listing the
    available linear layer names if nothing matched, and naming the layer if its ``d_in``
    is not divisible by ``group_size``.
    """
    GroupwiseIntQuantizer(bits, group_size)  # validates bits and group_size up front
    if callable(target_names):
        matches = target_names
        wanted = "predicate"
    else:
        if isinstance(target_names, str):
            target_names = [target_names]
        targets = frozenset(target_names)
        wanted = sorted(targets)

        def matches(name: str) -> bool:
            return name.rsplit(".", 1)[-1] in targets

    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    chosen = [(n, m) for n, m in linears if n and matches(n)]
    if not chosen:
        kinds = sorted({n.rsplit(".", 1)[-1] for n, _ in linears})
        raise ValueError(
            f"no nn.Linear layer matched target_names={wanted}; available linear layer "
            f"names: {kinds} ({len(linears)} layers)"
        )
    for name, linear in chosen:
        if linear.in_features % group_size != 0:
            raise ValueError(
                f"layer {name}: d_in={linear.in_features} is not divisible by "
                f"group_size={group_size}"
            )
    replaced = []
    if progress:
        from tqdm.auto import tqdm

        chosen = tqdm(chosen, desc=f"Quantizing INT{bits} g{group_size} ({params})", unit="layer", dynamic_ncols=True)
    for name, linear in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        quantized = GroupwiseIntLinear.from_linear(linear, bits, group_size, scale_dtype, params=params)
        setattr(parent, child, quantized)
        replaced.append(name)
    return replaced


@contextlib.contextmanager
def dequantized_weight_cache(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every :class:`GroupwiseIntLinear` of ``model`` keeps its dequantized
    weight between forwards (:meth:`GroupwiseIntLinear.cache_dequantized_weight`; exact, one
    dense copy of each weight); on exit the copies are dropped and each layer's own setting
    restored. For scoring an INT-b model on many short prompts (benchmarks)."""
    layers = [m for m in model.modules() if isinstance(m, GroupwiseIntLinear)]
    previous = [getattr(layer, "_cache_dense", False) for layer in layers]
    for layer in layers:
        layer.cache_dequantized_weight(True)
    try:
        yield model
    finally:
        for layer, enabled in zip(layers, previous):
            layer.cache_dequantized_weight(enabled)
