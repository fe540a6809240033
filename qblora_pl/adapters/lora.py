"""LoRA (QLoRA when the base is NF4): docs/method.md section 1.

``y = x W_hat^T + s * (dropout(x) A^T) B^T`` with ``A: r x d_in`` (Kaiming-uniform),
``B: d_out x r`` (zeros), ``s = alpha / r``. Trainable parameters: ``r * (d_in + d_out)``.
"""

from __future__ import annotations

import torch
from torch import nn

from qblora_pl.adapters.base import AdapterModule, AdapterStrategy, kaiming_uniform_, low_rank_singular_values, require_positive


class LoRAAdapter(AdapterModule):
    def __init__(self, d_in: int, d_out: int, r: int, scaling: float) -> None:
        super().__init__(d_in, d_out, scaling)
        self.lora_A = nn.Parameter(kaiming_uniform_(torch.empty(r, d_in)))
        self.lora_B = nn.Parameter(torch.zeros(d_out, r))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x @ self.lora_A.T) * self.scaling) @ self.lora_B.T

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.lora_B @ self.lora_A)

    def update_singular_values(self) -> torch.Tensor:
        return self.scaling * low_rank_singular_values(self.lora_B, self.lora_A)


class LoRA(AdapterStrategy):
    """Standard LoRA at rank ``r``; on an NF4 base this is QLoRA.

    Args:
        r: adapter rank.
        alpha: scaling numerator, ``s = alpha / r``.
        dropout: dropout on the adapter's input.
    """

    name = "lora"

    def __init__(self, r: int = 8, alpha: float = 16.0, dropout: float = 0.05) -> None:
        super().__init__(dropout)
        require_positive("LoRA", r=r, alpha=alpha)
        self.r = r
        self.alpha = alpha

    def build_adapter(self, layer_name, base, d_in, d_out) -> LoRAAdapter:
        return LoRAAdapter(d_in, d_out, self.r, self.alpha / self.r)
