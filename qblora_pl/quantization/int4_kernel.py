"""Opt-in fast inference for :class:`~qblora_pl.quantization.int_layer.GroupwiseIntLinear` (INT4 only).

:meth:`GroupwiseIntLinear.use_int4_kernel` /
:func:`~qblora_pl.quantization.int_layer.enable_int4_inference` route the no-grad forward through torch's weight-only INT4
kernels (``aten._weight_int4pack_mm_for_cpu`` on CPU, ``aten._weight_int4pack_mm`` on CUDA)
instead of dequantizing the whole weight per call. Those kernels compute in bfloat16, so this
path is *not* bit-exact (about 4e-3 relative output error); training, merges, exports and the
default forward keep the exact float32 dequantize path.

The layer's kernel methods are the :class:`Int4KernelPath` mixin below; the exact path stays
in :mod:`qblora_pl.quantization.int_layer`.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

__all__ = ["INT4_KERNEL_GROUP_SIZES", "Int4KernelFallbackWarning", "Int4KernelPath"]

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



class Int4KernelPath:
    """The INT4 kernel path of :class:`~qblora_pl.quantization.int_layer.GroupwiseIntLinear` (a mixin of it).

    Reads the layer's ``packed_codes``, ``scales``, ``offsets``, ``bias``, ``bits``,
    ``group_size``, ``in_features`` / ``out_features`` and its ``_int4_kernel`` / ``_int4_cache``
    state, which the layer initialises and invalidates.
    """

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

    def use_int4_kernel(self, enabled: bool = True) -> Int4KernelPath:
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
