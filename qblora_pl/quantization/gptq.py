"""GPTQ (Frantar et al., 2023) for one weight, into the group-wise INT-b format.

:func:`gptq_quantize` quantizes the columns of ``W`` (``d_out x d_in``) left to right; each
column's rounding error is spread over the columns not yet quantized through the Cholesky
factor of the inverse Hessian ``H = 2 X^T X / N`` of the layer's inputs ``X``, which lowers the
layer's output error ``||X W^T - X W_hat^T||`` compared with round-to-nearest. A group's scale
and offset are chosen when the sweep reaches its first column, from the error-updated weights
(min-max, or the MSE search of :mod:`qblora_pl.quantization.group_search`). No activation
reordering: groups stay contiguous, so QA-LoRA / QA-BLoRA merges into the offsets stay exact.

:class:`HessianAccumulator` sums ``X^T X`` over calibration batches. The whole-model driver
(every decoder layer on the outputs of the already-quantized layers before it) is
:mod:`qblora_pl.quantization.calibration`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["HessianAccumulator", "gptq_quantize"]


class HessianAccumulator:
    """Running ``H = 2 X^T X / N`` of a linear layer's inputs (float32, ``d_in x d_in``)."""

    def __init__(self, d_in: int, device: torch.device | str | None = None) -> None:
        self.d_in = d_in
        self.sum = torch.zeros(d_in, d_in, dtype=torch.float32, device=device)
        self.rows = 0

    @torch.no_grad()
    def add(self, inputs: Tensor) -> None:
        """Add a batch of inputs ``(..., d_in)`` (every position is one row of ``X``)."""
        if inputs.shape[-1] != self.d_in:
            raise ValueError(f"calibration input has last dimension {inputs.shape[-1]}, expected d_in={self.d_in}")
        x = inputs.detach().reshape(-1, self.d_in).to(device=self.sum.device, dtype=torch.float32)
        self.sum.addmm_(x.T, x)
        self.rows += x.shape[0]

    def hessian(self) -> Tensor:
        if self.rows == 0:
            raise ValueError("GPTQ needs at least one calibration row; got none")
        return self.sum * (2.0 / self.rows)


@torch.no_grad()
def gptq_quantize(
    quantizer: Any,  # a GroupwiseIntQuantizer (which imports this module for its quantize_gptq)
    weight: Tensor,
    hessian: Tensor,
    damp: float = 0.01,
    block_size: int = 128,
    param_dtype: torch.dtype | None = None,
    params: str = "minmax",
    static_groups: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """GPTQ-quantize ``weight`` (``d_out x d_in``) for inputs whose Hessian is ``hessian``.

    ``damp`` is the fraction of the mean Hessian diagonal added to the diagonal (GPTQ's
    dampening, 0.01 as in GPTQ and llm-compressor); inputs that are always zero (a dead
    column) get weight 0. ``block_size`` is the lazy-batch width, rounded to whole groups.
    ``params`` chooses each group's scale and offset (``"minmax"`` or ``"mse"``): from the
    error-updated weights when the sweep reaches the group (GPTQ's reference implementation), or,
    with ``static_groups``, from the original weights before the sweep (llm-compressor's order).
    Returns ``codes`` (uint8), ``scales``, ``offsets`` (float32) as ``quantizer.quantize``.
    """
    quantizer._check_weight(weight)
    d_out, d_in = weight.shape
    g = quantizer.group_size
    n_groups = quantizer.num_groups(d_in)
    if tuple(hessian.shape) != (d_in, d_in):
        raise ValueError(f"hessian has shape {tuple(hessian.shape)}, expected ({d_in}, {d_in})")
    hessian = hessian.to(device=weight.device, dtype=torch.float32).clone()
    w = weight.detach().float().clone()
    dead = torch.diag(hessian) == 0
    hessian[dead, dead] = 1.0
    w[:, dead] = 0.0
    hessian.diagonal().add_(damp * torch.diag(hessian).mean())
    hinv = _inverse_cholesky(hessian)

    # Block boundaries on group boundaries, so every group lies inside one block.
    block = max(g, (block_size // g) * g)
    codes = torch.zeros(d_out, d_in, dtype=torch.uint8, device=weight.device)
    scales = torch.zeros(d_out, n_groups, dtype=torch.float32, device=weight.device)
    offsets = torch.zeros_like(scales)
    max_code = quantizer.max_code
    if static_groups:
        groups = weight.detach().float().reshape(d_out, n_groups, g)
        scales[:], offsets[:] = quantizer.group_params(groups, param_dtype, params)
    for i1 in range(0, d_in, block):
        i2 = min(i1 + block, d_in)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % g == 0 and not static_groups:
                scales[:, col // g], offsets[:, col // g] = quantizer.group_params(w1[:, i : i + g], param_dtype, params)
            s, m = scales[:, col // g], offsets[:, col // g]
            column = w1[:, i]
            q = torch.round((column - m) / s).clamp_(0, max_code)
            codes[:, col] = q.to(torch.uint8)
            err = (column - (q * s + m)) / hinv1[i, i]
            w1[:, i:] -= err.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return codes, scales, offsets


def _inverse_cholesky(hessian: Tensor) -> Tensor:
    """Upper Cholesky factor of ``H^-1``; raises naming the fix when ``H`` is not positive definite."""
    chol, info = torch.linalg.cholesky_ex(hessian)
    if int(info) != 0:
        raise ValueError(
            "GPTQ: the calibration Hessian is not positive definite even after dampening (too few or "
            "degenerate calibration tokens for this layer); use more calibration_records or a longer "
            "calibration_seq_len"
        )
    return torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)
