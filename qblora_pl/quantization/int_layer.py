"""The frozen group-wise INT-b base layer (docs/method.md section 3), and the model-wide helpers over it.

- :class:`GroupwiseIntLinear` - the frozen quantized base layer: bit-packed codes,
  scales and offsets as buffers, dequantized on the fly in ``forward``. Adapter strategies
  wrap it; they never copy it.
- :func:`quantize_linear_layers` - swaps a model's target ``nn.Linear`` layers for
  :class:`GroupwiseIntLinear` in place.
- :func:`enable_int4_inference` - switches every eligible layer to torch's INT4 kernel
  (:mod:`qblora_pl.quantization.int4_kernel`: fast, not bit-exact; training keeps the exact path).
- :func:`dequantized_weight_cache` - keeps each layer's dequantized weight between forwards
  (exact; for scoring many short prompts).

The arithmetic of the format is :class:`~qblora_pl.quantization.int_quantizer.GroupwiseIntQuantizer`.
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
from qblora_pl.quantization.int4_kernel import Int4KernelFallbackWarning, Int4KernelPath, _warn_int4_fallback_once
from qblora_pl.quantization.int_quantizer import GroupwiseIntQuantizer
from qblora_pl.quantization.packing import pack_codes, unpack_codes

__all__ = [
    "GroupwiseIntLinear",
    "dequantized_weight_cache",
    "enable_int4_inference",
    "quantize_linear_layers",
]


class GroupwiseIntLinear(Int4KernelPath, nn.Module):
    """Frozen linear layer whose weight is stored group-wise quantized (docs/method.md section 3).

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

        The one code path for the training forward, merges and exports (docs/method.md
        sections 3-4). Computed in float32 (in row blocks, dequant_linear.py), then cast to
        ``dtype`` if given.
        """
        return dequantize_packed(
            self.quantizer, self.packed_codes, self.scales, self.offsets, self.in_features, dtype or torch.float32
        )

    def forward(self, x: Tensor, scales: Tensor | None = None, offset_delta: Tensor | None = None) -> Tensor:
        """``y = x W_hat^T + b`` with ``W_hat`` dequantized on the fly in ``x.dtype``.

        ``scales`` replaces the layer's own group scales for this call (an adapter's learned scales,
        which get their gradient through it). ``offset_delta`` is added to the offsets in float32
        for this call, as a merge adds it (a QA-* adapter's update, which gets its gradient
        through it); the codes are the layer's.
        With :meth:`use_int4_kernel` enabled and autograd off, torch's INT4 kernel instead
        (bfloat16 compute, not bit-exact; see :meth:`use_int4_kernel`).
        """
        if scales is not None or offset_delta is not None:
            bias = None if self.bias is None else self.bias.to(x.dtype)
            scales = self.scales if scales is None else scales
            if torch.is_grad_enabled():
                return DequantizingLinear.apply(x, self.packed_codes, scales, self.offsets, bias, self.quantizer,
                                                self.in_features, offset_delta)
            offsets = self.offsets if offset_delta is None else self.offsets.float() + offset_delta.float()
            weight = dequantize_packed(self.quantizer, self.packed_codes, scales, offsets, self.in_features, x.dtype)
            return F.linear(x, weight, bias)
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

    Builds the frozen low-bit base of docs/method.md section 3. ``target_names`` is either a
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
