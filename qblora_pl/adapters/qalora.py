"""QA-LoRA - the quantization-aware baseline (Xu et al., ICLR 2024): docs/method.md section 3.

``y = x W_hat^T + s * (pool_w(x) A^T) B^T`` with ``A: r x (d_in / w)``, ``B: d_out x r`` and the
pooling window ``w`` equal to (or a multiple of) the base's quantization group size. The
update is constant inside each group, so it folds exactly into the group offsets:
``offset'[o, G] = offset[o, G] + s * (B A)[o, G] / w``.
"""

from __future__ import annotations

import torch
from torch import nn

from qblora_pl.adapters.base import (
    AdapterConfigError,
    AdapterStrategy,
    GroupConstantAdapter,
    kaiming_uniform_,
    low_rank_singular_values,
    require_divisible,
    require_non_negative,
    require_positive,
)
from qblora_pl.quantization.int_layer import GroupwiseIntLinear


class QALoRAAdapter(GroupConstantAdapter):
    def __init__(self, d_in: int, d_out: int, r: int, pool_window: int, scaling: float) -> None:
        super().__init__(d_in, d_out, scaling)
        self.pool_window = pool_window
        self.lora_A = nn.Parameter(kaiming_uniform_(torch.empty(r, d_in // pool_window)))
        self.lora_B = nn.Parameter(torch.zeros(d_out, r))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((self.pool(x) @ self.lora_A.T) * self.scaling) @ self.lora_B.T

    def window_delta(self) -> torch.Tensor:
        return self.scaling * (self.lora_B @ self.lora_A) / self.pool_window

    def update_singular_values(self) -> torch.Tensor:
        # dW = s (B A) P with P P^T = I / window (mean pooling).
        return self.scaling / self.pool_window**0.5 * low_rank_singular_values(self.lora_B, self.lora_A)


def resolve_pool_window(layer_name: str, base: GroupwiseIntLinear, pool_window: int | None, d_in: int) -> int:
    """The pooling window: the base's group size unless given; it must be a multiple of it."""
    window = base.group_size if pool_window is None else pool_window
    if window % base.group_size != 0:
        raise AdapterConfigError(
            f"layer {layer_name}: pool_window={window} is not a multiple of the base's "
            f"group_size={base.group_size}; the update would not fold into the group offsets"
        )
    require_divisible(layer_name, "d_in", d_in, "pool_window", window)
    return window


class QALoRA(AdapterStrategy):
    """QA-LoRA at rank ``r`` on a group-wise INT-b base.

    Args:
        r: adapter rank.
        alpha: scaling numerator, ``s = alpha / r``.
        pool_window: input pooling window; ``None`` uses the base's quantization group size.
            Must be a multiple of the group size.
        dropout: dropout on the adapter's input.
        scale_rank: also train the base's group scales by a rank-``scale_rank`` relative update,
            ``s' = s * (1 + B_s A_s)``, merged exactly into the scales (0: scales frozen;
            ``min(d_out, d_in / group_size)`` or more: every group scale free). Adds
            ``scale_rank * (d_out + d_in / group_size)`` parameters per layer.
    """

    name = "qalora"
    requires_offsets = True

    def __init__(self, r: int = 8, alpha: float = 16.0, pool_window: int | None = None, dropout: float = 0.05,
                 scale_rank: int = 0) -> None:
        super().__init__(dropout)
        require_positive("QA-LoRA", r=r, alpha=alpha, pool_window=pool_window)
        require_non_negative("QA-LoRA", scale_rank=scale_rank)
        self.r, self.alpha, self.pool_window, self.scale_rank = r, alpha, pool_window, scale_rank

    def build_adapter(self, layer_name, base, d_in, d_out) -> QALoRAAdapter:
        window = resolve_pool_window(layer_name, base, self.pool_window, d_in)
        adapter = QALoRAAdapter(d_in, d_out, self.r, window, self.alpha / self.r)
        adapter.learn_scales(d_out, d_in // base.group_size, self.scale_rank)
        return adapter
