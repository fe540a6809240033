"""QA-BLoRA - quantization-aware balanced adaptation: docs/method.md section 4.

Q-BLoRA's two factors become one matrix aligned with the quantization groups:
``y = x W_hat^T + s * repeat_{k_out}(pool_w(x) M^T)``, ``M: (d_out / k_out) x (d_in / w)``.
``dW`` is constant inside each group, so it folds exactly into the offsets:
``offset'[o, G] = offset[o, G] + s * M[o // k_out, G] / w``. ``M`` starts at zero, so the
first forward pass equals the base model's (a single matrix trains fine from zero).
"""

from __future__ import annotations

import torch
from torch import nn

from qblora_pl.adapters.base import (
    AdapterStrategy,
    GroupConstantAdapter,
    add_repeated,
    require_divisible,
    require_non_negative,
    require_positive,
)
from qblora_pl.adapters.budget import choose_k_out, scale_update_parameter_count
from qblora_pl.adapters.qalora import resolve_pool_window


class QABLoRAAdapter(GroupConstantAdapter):
    def __init__(self, d_in: int, d_out: int, k_out: int, pool_window: int, scaling: float) -> None:
        super().__init__(d_in, d_out, scaling)
        self.k_out, self.pool_window = k_out, pool_window
        self.balanced_M = nn.Parameter(torch.zeros(d_out // k_out, d_in // pool_window))

    def low_rank_output(self, x: torch.Tensor) -> torch.Tensor:
        """``s * M pool(x)``: the update before its outputs are repeated."""
        return (self.pool(x) * self.scaling) @ self.balanced_M.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.low_rank_output(x).repeat_interleave(self.k_out, dim=-1)

    def add_delta(self, result: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return add_repeated(result, self.low_rank_output(x), self.k_out)

    def window_delta(self) -> torch.Tensor:
        return (self.scaling * self.balanced_M / self.pool_window).repeat_interleave(self.k_out, dim=0)

    def update_singular_values(self) -> torch.Tensor:
        # dW = s E M P with E^T E = k_out I and P P^T = I / window: the spectrum of the small M.
        return self.scaling * (self.k_out / self.pool_window) ** 0.5 * torch.linalg.svdvals(self.balanced_M.detach().float())


class QABLoRA(AdapterStrategy):
    """QA-BLoRA on a group-wise INT-b base.

    Args:
        budget_rank: the LoRA rank whose parameter budget ``r * (d_in + d_out)`` each layer's
            matrix matches (through ``k_out``); also the scaling denominator, ``s = alpha / r``.
        alpha: scaling numerator.
        k_out: output repeat factor; ``None`` lets the budget helper choose it per layer.
        pool_window: input pooling window; ``None`` uses the base's quantization group size.
        dropout: dropout on the adapter's input.
        scale_rank: also train the base's group scales by a rank-``scale_rank`` relative update,
            ``s' = s * (1 + B_s A_s)``, merged exactly into the scales (0: scales frozen). Its
            ``scale_rank * (d_out + d_in / group_size)`` parameters count in the budget: the
            automatic ``k_out`` is chosen for what remains.
    """

    name = "qablora"
    requires_offsets = True

    def __init__(
        self,
        budget_rank: int = 8,
        alpha: float = 16.0,
        k_out: int | None = None,
        pool_window: int | None = None,
        dropout: float = 0.05,
        scale_rank: int = 0,
    ) -> None:
        super().__init__(dropout)
        require_positive("QA-BLoRA", budget_rank=budget_rank, alpha=alpha, k_out=k_out, pool_window=pool_window)
        require_non_negative("QA-BLoRA", scale_rank=scale_rank)
        self.budget_rank, self.alpha, self.k_out, self.pool_window = budget_rank, alpha, k_out, pool_window
        self.scale_rank = scale_rank

    def build_adapter(self, layer_name, base, d_in, d_out) -> QABLoRAAdapter:
        window = resolve_pool_window(layer_name, base, self.pool_window, d_in)
        n_groups = d_in // base.group_size
        reserved = scale_update_parameter_count(d_out, n_groups, self.scale_rank)
        k_out = self.k_out if self.k_out is not None else choose_k_out(d_in, d_out, window, self.budget_rank, reserved)
        require_divisible(layer_name, "d_out", d_out, "k_out", k_out)
        adapter = QABLoRAAdapter(d_in, d_out, k_out, window, self.alpha / self.budget_rank)
        adapter.learn_scales(d_out, n_groups, self.scale_rank)
        return adapter
