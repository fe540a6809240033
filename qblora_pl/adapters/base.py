"""The adapter-strategy interface and the layer that applies an adapter to a frozen base.

Three small pieces (STYLE.md practices 1 and 2):

* :class:`AdapterStrategy` - the object chosen in YAML by ``class_path``. It holds the
  method's hyper-parameters and builds one :class:`AdapterModule` per target layer, after
  checking that the layer's shape and base storage suit the method.
* :class:`AdapterModule` - the trainable part for one layer. It computes the scaled update
  ``s * delta(x)`` (the forward delta) and the equivalent dense ``dW`` (``d_out x d_in``), so
  ``y = x W_hat^T + forward_delta(x) == x (W_hat + dW)^T``. Group-constant adapters (QA-LoRA,
  QA-BLoRA) also give the per-group offset update that folds exactly into an INT-b base.
* :class:`AdaptedLinear` - wraps (never copies) the frozen base layer, adds the adapter's
  delta, and merges / unmerges it. Merge is idempotent and checks for non-finite values.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn

from qblora_pl.quantization.base_layers import (
    dequantized_weight,
    describe_base,
    is_base_linear,
    linear_shape,
)
from qblora_pl.quantization.int_layer import GroupwiseIntLinear


class AdapterConfigError(ValueError):
    """A strategy's hyper-parameters do not fit a layer (shape, divisibility, base type)."""


class AdapterModule(nn.Module, ABC):
    """The trainable part of one adapted linear layer.

    Parameters are created in float32 (fp32 master copies: an AdamW step at LR 2e-4 can be
    below bf16 resolution), whatever dtype the base computes in.
    """

    def __init__(self, d_in: int, d_out: int, scaling: float) -> None:
        super().__init__()
        self.d_in = d_in
        self.d_out = d_out
        self.scaling = float(scaling)

    @abstractmethod
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The scaled update ``s * delta(x)`` for inputs ``x`` of shape ``(..., d_in)``."""

    @abstractmethod
    def delta_weight(self) -> torch.Tensor:
        """The equivalent dense update ``dW`` (``d_out x d_in``, already scaled)."""

    def add_delta(self, result: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``result + forward(x)``; adapters with repeated outputs override it to broadcast the
        repeat into the addition instead of materialising the repeated tensor."""
        return result + self(x).to(result.dtype)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def update_singular_values(self) -> torch.Tensor:
        """Singular values of ``dW`` (descending). Subclasses compute them from the factors,
        without materialising the ``d_out x d_in`` update; this fallback is the dense SVD."""
        return torch.linalg.svdvals(self.delta_weight().float())

    def shapes(self) -> dict[str, list[int]]:
        return {name: list(p.shape) for name, p in self.named_parameters()}


class GroupConstantAdapter(AdapterModule):
    """An adapter whose update is constant on every window of ``pool_window`` input features.

    That is the property that lets QA-LoRA / QA-BLoRA fold exactly into the per-group
    offsets of a group-wise INT-b base (docs/method.md sections 3 and 4).
    """

    pool_window: int
    #: rank of the learned update of the base's group scales; 0: the scales stay frozen (:meth:`learn_scales`)
    scale_rank: int = 0

    def learn_scales(self, d_out: int, n_groups: int, rank: int) -> None:
        """Also train the base's group scales: ``s' = s * (1 + B_s A_s)`` (docs/method.md section 7).

        ``B_s: d_out x rank`` starts at zero (so ``s' = s`` at first) and ``A_s: rank x n_groups``
        like LoRA's ``A``: ``rank * (d_out + n_groups)`` parameters. The update is relative, so one
        learning rate suits scales of any magnitude; it merges exactly into the scales.
        """
        self.scale_rank = rank
        if rank:
            self.scale_B = nn.Parameter(torch.zeros(d_out, rank))
            self.scale_A = nn.Parameter(kaiming_uniform_(torch.empty(rank, n_groups)))

    def trained_scales(self, scales: torch.Tensor) -> torch.Tensor | None:
        """The base's ``scales`` with the learned update, or None without one.

        Rounded to the scales' stored dtype (float16 by default) in the forward pass, with the
        gradient passed straight through, so the merged scales the exports store are the ones trained.
        """
        if not self.scale_rank:
            return None
        trained = scales.float() * (1.0 + self.scale_B @ self.scale_A)
        stored = trained.detach().to(scales.dtype).float()
        return trained + (stored - trained).detach()

    @abstractmethod
    def window_delta(self) -> torch.Tensor:
        """``dW`` restricted to one value per pooling window: ``(d_out, d_in / pool_window)``."""

    def delta_weight(self) -> torch.Tensor:
        return self.window_delta().repeat_interleave(self.pool_window, dim=1)

    def group_offset_delta(self, group_size: int) -> torch.Tensor:
        """Offset update per quantization group, ``(d_out, d_in / group_size)``.

        ``offset'[o, G] = offset[o, G] + dW[o, j in G]`` - exact because ``dW`` is constant on
        each group when the pooling window is a multiple of the group size.
        """
        if self.pool_window % group_size != 0:
            raise AdapterConfigError(
                f"pooling window {self.pool_window} is not a multiple of the quantization "
                f"group size {group_size}: the update cannot fold into the group offsets"
            )
        return self.window_delta().repeat_interleave(self.pool_window // group_size, dim=1)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Mean over consecutive windows of ``pool_window`` input features."""
        return mean_pool(x, self.pool_window)


class AdapterStrategy(ABC):
    """A method (LoRA, Q-BLoRA, QA-LoRA, QA-BLoRA): its hyper-parameters and a layer builder.

    Subclasses set ``name`` and implement :meth:`build_adapter`. ``requires_offsets`` marks
    methods that only make sense on a base with per-group offsets to merge into.
    """

    name: str = "adapter"
    requires_offsets: bool = False

    def __init__(self, dropout: float = 0.0) -> None:
        if not 0.0 <= dropout < 1.0:
            raise AdapterConfigError(f"dropout={dropout} must be in [0, 1)")
        self.dropout = dropout

    @abstractmethod
    def build_adapter(self, layer_name: str, base: nn.Module, d_in: int, d_out: int) -> AdapterModule:
        """Create the trainable module for one layer, or raise AdapterConfigError naming it."""

    def hparams(self) -> dict[str, Any]:
        """The strategy's hyper-parameters, recorded in adapter checkpoints."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def wrap(self, layer_name: str, base: nn.Module) -> "AdaptedLinear":
        if not is_base_linear(base):
            raise AdapterConfigError(
                f"layer {layer_name}: {type(base).__name__} is not a linear layer this "
                f"framework can adapt"
            )
        if self.requires_offsets and not isinstance(base, GroupwiseIntLinear):
            raise AdapterConfigError(
                f"layer {layer_name}: {type(self).__name__} merges into per-group offsets, but "
                f"the base is {describe_base(base)}, which has none. Use the group-wise integer "
                f"backend (model.quantization.class_path: qblora_pl.quantization.GroupwiseInt)."
            )
        d_out, d_in = linear_shape(base)
        adapter = self.build_adapter(layer_name, base, d_in, d_out)
        return AdaptedLinear(base, adapter, dropout=self.dropout)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hparams().items())
        return f"{type(self).__name__}({args})"


class _AddRepeated(torch.autograd.Function):
    """``result + repeat_interleave(low, k)`` with a backward made of strided-slice sums.

    Autograd's own backward of the broadcast reduces over an innermost dimension of size
    ``k``, which CPU kernels do slowly; summing the ``k`` strided slices is plain adds.
    """

    @staticmethod
    def forward(ctx, result: torch.Tensor, low: torch.Tensor, k: int) -> torch.Tensor:
        ctx.k = k
        return (result.unflatten(-1, (low.shape[-1], k)) + low.unsqueeze(-1)).flatten(-2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_low = grad[..., 0 :: ctx.k]
        for j in range(1, ctx.k):
            grad_low = grad_low + grad[..., j :: ctx.k]
        return grad, grad_low, None


class _MeanPool(torch.autograd.Function):
    """Mean over consecutive groups of ``k`` features as ``k`` strided-slice adds (small ``k``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, k: int) -> torch.Tensor:
        ctx.k = k
        out = x[..., 0::k]
        for j in range(1, k):
            out = out + x[..., j::k]
        return out * (1.0 / k)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        k = ctx.k
        return (grad * (1.0 / k)).unsqueeze(-1).expand(*grad.shape, k).flatten(-2), None


def mean_pool(x: torch.Tensor, k: int) -> torch.Tensor:
    """Average pooling over consecutive groups of ``k`` input features (docs/method.md 2-4)."""
    if k == 1:
        return x
    if k <= 4:
        return _MeanPool.apply(x, k)
    return x.unflatten(-1, (x.shape[-1] // k, k)).mean(-1)  # contiguous reduction: fast


def add_repeated(result: torch.Tensor, low: torch.Tensor, k_out: int) -> torch.Tensor:
    """``result + low.repeat_interleave(k_out, -1)`` without building the repeated tensor."""
    if k_out == 1:
        return result + low.to(result.dtype)
    return _AddRepeated.apply(result, low.to(result.dtype), k_out)


def require_positive(method: str, **values: float | None) -> None:
    """Raise AdapterConfigError naming the method and value for each given value that is not > 0.

    ``None`` means "chosen automatically" and is skipped. ``alpha`` scales the update by
    ``alpha / r``: 0 would train adapters that change nothing, a negative value flips the update.
    """
    for key, value in values.items():
        if value is None:
            continue
        if not (math.isfinite(value) and value > 0):
            why = " (the update is scaled by alpha / r: 0 trains nothing)" if key == "alpha" else ""
            raise AdapterConfigError(f"{method} {key}={value} must be positive{why}")


def require_non_negative(method: str, **values: int) -> None:
    """Raise AdapterConfigError naming the method and value for each value that is not an integer >= 0."""
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise AdapterConfigError(f"{method} {key}={value!r} must be an integer >= 0 (0 turns it off)")


def require_divisible(layer_name: str, dim_name: str, dim: int, factor_name: str, factor: int) -> None:
    """Raise AdapterConfigError naming the layer and numbers when ``dim % factor != 0``."""
    if factor <= 0:
        raise AdapterConfigError(f"layer {layer_name}: {factor_name}={factor} must be positive")
    if dim % factor != 0:
        raise AdapterConfigError(
            f"layer {layer_name}: {dim_name}={dim} is not divisible by {factor_name}={factor}"
        )


@torch.no_grad()
def low_rank_singular_values(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Singular values of ``left @ right`` (``n x r`` times ``r x m``) via two thin QRs.

    ``left = Q1 R1`` and ``right^T = Q2 R2`` give ``left @ right = Q1 (R1 R2^T) Q2^T``, so the
    spectrum is that of the small ``r x r`` core: O((n + m) r^2) instead of a dense SVD.
    """
    _, r_left = torch.linalg.qr(left.float())
    _, r_right = torch.linalg.qr(right.float().T)
    return torch.linalg.svdvals(r_left @ r_right.T)


def kaiming_uniform_(weight: torch.Tensor) -> torch.Tensor:
    """LoRA's ``A`` initialisation (the same as ``nn.Linear``'s default and PEFT's)."""
    return nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


class AdaptedLinear(nn.Module):
    """A frozen base linear layer plus an adapter: ``y = base(x) + adapter(dropout(x))``.

    ``merge()`` folds the update into the model:

    * group-constant adapter on a :class:`GroupwiseIntLinear` base: into the per-group
      offsets, in place; every weight stays b-bit and the result is exact (docs/method.md 3-4);
    * anything else: into a dense copy ``W_hat + dW`` (exact in 16/32-bit; re-quantizing it
      is a separate, lossy step).

    ``unmerge()`` restores the original base bit for bit. Both are idempotent.
    """

    def __init__(self, base_layer: nn.Module, adapter: AdapterModule, dropout: float = 0.0) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapter = adapter
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        # Set by the QAT schedule: an object whose .weight(self) is the fake-quantized merged
        # weight the export will hold (qblora_pl.qat); None trains the plain adapter.
        self.fake_quant = None
        # Train QA-* updates through the base's offsets (see forward); False keeps the separate
        # adapter branch, which computes the same function with other rounding.
        self.fold_offsets = True
        # What merge() replaced ((offsets, scales) or the original base module). A plain list,
        # so nn.Module does not register the stashed base as a submodule of its own.
        self._unmerged_stash: list[nn.Module | tuple[torch.Tensor, torch.Tensor]] = []
        d_out, d_in = linear_shape(base_layer)
        self.in_features, self.out_features = d_in, d_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fake_quant is not None and not self.merged:
            # QAT: compute with the weight the export will write (adapter dropout does not
            # apply: the update is inside the weight).
            weight = self.fake_quant.weight(self)
            bias = self.base_bias
            return torch.nn.functional.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
        scales = None if self.merged else self.trained_scales()
        if not self.merged and self._folds_into_offsets():
            # Training a QA-* adapter without dropout: its update rides in the offsets, as the merge
            # puts it, so one dequantized matmul gives base + update (the merged layer's output)
            # and the update's gradient comes from x's per-group sums (dequant_linear.py).
            delta = self.adapter.group_offset_delta(self.base_layer.group_size)
            return self.base_layer(x, scales=scales, offset_delta=delta)
        result = self.base_layer(x) if scales is None else self.base_layer(x, scales=scales)
        if self.merged:
            return result
        return self.adapter.add_delta(result, self.dropout(x).to(self.adapter.dtype))

    def _folds_into_offsets(self) -> bool:
        """Whether this forward computes the update through the offsets: a QA-* layer under autograd,
        no adapter dropout in effect (dropout acts on ``x`` before pooling, which the offsets cannot
        carry), a pooling window that covers whole groups, and not switched off (``fold_offsets``)."""
        return (self.fold_offsets and torch.is_grad_enabled() and self.merges_into_offsets
                and (not self.training or isinstance(self.dropout, nn.Identity))
                and self.adapter.pool_window % self.base_layer.group_size == 0)

    def trained_scales(self) -> torch.Tensor | None:
        """The base's group scales with the adapter's learned update (``scale_rank``), or None."""
        if not isinstance(self.adapter, GroupConstantAdapter) or not self.adapter.scale_rank:
            return None
        return self.adapter.trained_scales(self.base_layer.scales)

    @property
    def merges_into_offsets(self) -> bool:
        return isinstance(self.base_layer, GroupwiseIntLinear) and isinstance(
            self.adapter, GroupConstantAdapter
        )

    @torch.no_grad()
    def merged_dense_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``W_hat + dW`` as a dense matrix (for 16-bit export or re-quantization)."""
        if self.merged:
            return dequantized_weight(self.base_layer, torch.float32).to(dtype)
        scales = self.trained_scales()
        if scales is None:
            weight = dequantized_weight(self.base_layer, torch.float32)
        else:
            base = self.base_layer
            weight = base.quantizer.dequantize(base.codes(), scales, base.offsets)
        return (weight + self.adapter.delta_weight().float()).to(dtype)

    @torch.no_grad()
    def merge(self, name: str = "", dense_dtype: torch.dtype = torch.float32) -> None:
        if self.merged:
            return
        if self.merges_into_offsets:
            base: GroupwiseIntLinear = self.base_layer  # type: ignore[assignment]
            delta = self.adapter.group_offset_delta(base.group_size).float()
            new_offsets = base.offsets.float() + delta
            _check_finite(new_offsets, name, "merged offsets")
            scales = self.trained_scales()
            if scales is not None:
                _check_finite(scales, name, "merged scales")
            self._unmerged_stash.append((base.offsets, base.scales))
            base.offsets = new_offsets
            if scales is not None:  # already a value of the stored dtype: the cast is exact
                base.scales = scales.to(base.scales.dtype)
        else:
            weight = self.merged_dense_weight(torch.float32)
            _check_finite(weight, name, "merged weight")
            dense = nn.Linear(self.in_features, self.out_features, bias=self.base_bias is not None)
            dense = dense.to(device=weight.device, dtype=dense_dtype)
            dense.weight.copy_(weight.to(dense_dtype))
            if self.base_bias is not None:
                dense.bias.copy_(self.base_bias.to(dense_dtype))
            dense.requires_grad_(False)
            self._unmerged_stash.append(self.base_layer)
            self.base_layer = dense
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        original = self._unmerged_stash.pop()
        if isinstance(original, tuple):
            self.base_layer.offsets, self.base_layer.scales = original
        else:
            self.base_layer = original
        self.merged = False

    @property
    def base_bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def extra_repr(self) -> str:
        return f"base={describe_base(self.base_layer)}, merged={self.merged}"


def _check_finite(tensor: torch.Tensor, name: str, what: str) -> None:
    if not torch.isfinite(tensor).all():
        bad = (~torch.isfinite(tensor)).sum().item()
        raise FloatingPointError(f"layer {name or '?'}: {what} has {bad} non-finite values; merge aborted")
