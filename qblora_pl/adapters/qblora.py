"""Q-BLoRA - balanced low-rank adaptation: docs/method.md section 2.

Pool the input by ``k_in`` (mean of consecutive features), apply a low-rank map at rank
``r' = m * r``, repeat each output ``k_out`` times:

``y = x W_hat^T + s * E(B A P x)`` with ``A: r' x (d_in / k_in)``, ``B: (d_out / k_out) x r'``,
``s = alpha / r`` (the budget rank stays in the scaling, as in the reference code).
The dense update is ``dW = s * E B A P``: constant on every ``k_out x k_in`` tile. With
``k_in = k_out = m`` the parameter count equals LoRA's at rank ``r`` while ``dW`` can reach
rank ``m * r``.
"""

from __future__ import annotations

import torch
from torch import nn

from qblora_pl.adapters.base import (
    AdapterModule,
    AdapterStrategy,
    add_repeated,
    mean_pool,
    kaiming_uniform_,
    low_rank_singular_values,
    require_divisible,
    require_positive,
)


class QBLoRAAdapter(AdapterModule):
    def __init__(self, d_in: int, d_out: int, rank: int, k_in: int, k_out: int, scaling: float) -> None:
        super().__init__(d_in, d_out, scaling)
        self.k_in, self.k_out = k_in, k_out
        self.lora_A = nn.Parameter(kaiming_uniform_(torch.empty(rank, d_in // k_in)))
        self.lora_B = nn.Parameter(torch.zeros(d_out // k_out, rank))

    def low_rank_output(self, x: torch.Tensor) -> torch.Tensor:
        """``s * B A P x``: the update before its outputs are repeated (``d_out / k_out`` wide)."""
        pooled = mean_pool(x, self.k_in)
        return ((pooled @ self.lora_A.T) * self.scaling) @ self.lora_B.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.low_rank_output(x).repeat_interleave(self.k_out, dim=-1)

    def add_delta(self, result: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return add_repeated(result, self.low_rank_output(x), self.k_out)

    def delta_weight(self) -> torch.Tensor:
        tile = self.scaling * (self.lora_B @ self.lora_A) / self.k_in
        return tile.repeat_interleave(self.k_out, dim=0).repeat_interleave(self.k_in, dim=1)

    def update_singular_values(self) -> torch.Tensor:
        # dW = s E (B A) P with E^T E = k_out I (repeat) and P P^T = I / k_in (mean pooling).
        factor = self.scaling * (self.k_out / self.k_in) ** 0.5
        return factor * low_rank_singular_values(self.lora_B, self.lora_A)


class QBLoRA(AdapterStrategy):
    """Q-BLoRA at budget rank ``r``.

    Args:
        r: the budget rank (the LoRA rank whose parameter count this matches when
            ``k_in = k_out = rank_multiplier``); also the denominator of the scaling.
        alpha: scaling numerator, ``s = alpha / r``.
        k_in: input pooling factor (mean over ``k_in`` consecutive input features).
        k_out: output repeat factor (each low-rank output feeds ``k_out`` outputs).
        rank_multiplier: ``m``; the adapter's inner rank is ``m * r``.
        dropout: dropout on the adapter's input.
    """

    name = "qblora"

    def __init__(
        self,
        r: int = 8,
        alpha: float = 16.0,
        k_in: int = 2,
        k_out: int = 2,
        rank_multiplier: int = 2,
        dropout: float = 0.05,
    ) -> None:
        super().__init__(dropout)
        require_positive("Q-BLoRA", r=r, alpha=alpha, k_in=k_in, k_out=k_out, rank_multiplier=rank_multiplier)
        self.r, self.alpha = r, alpha
        self.k_in, self.k_out, self.rank_multiplier = k_in, k_out, rank_multiplier

    def build_adapter(self, layer_name, base, d_in, d_out) -> QBLoRAAdapter:
        require_divisible(layer_name, "d_in", d_in, "k_in", self.k_in)
        require_divisible(layer_name, "d_out", d_out, "k_out", self.k_out)
        return QBLoRAAdapter(
            d_in, d_out, self.rank_multiplier * self.r, self.k_in, self.k_out, self.alpha / self.r
        )
