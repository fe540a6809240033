"""Parameter budgets: match QA-BLoRA's size to a LoRA of rank ``r`` (docs/method.md section 4)."""

from __future__ import annotations


def lora_parameter_count(d_in: int, d_out: int, r: int) -> int:
    """Trainable parameters of LoRA at rank ``r``: ``r * (d_in + d_out)``."""
    return r * (d_in + d_out)


def qablora_parameter_count(d_in: int, d_out: int, pool_window: int, k_out: int) -> int:
    """Trainable parameters of QA-BLoRA's single matrix ``M: (d_out/k_out) x (d_in/window)``."""
    return (d_out // k_out) * (d_in // pool_window)


def scale_update_parameter_count(d_out: int, n_groups: int, scale_rank: int) -> int:
    """Trainable parameters of a learned-scale update of rank ``scale_rank``: ``scale_rank * (d_out + n_groups)``."""
    return scale_rank * (d_out + n_groups)


def choose_k_out(d_in: int, d_out: int, pool_window: int, budget_rank: int, reserved: int = 0) -> int:
    """The smallest divisor ``k_out`` of ``d_out`` whose QA-BLoRA fits LoRA-``r``'s budget.

    Smallest ``k_out`` means the largest matrix within the budget. For a 4096 x 4096 layer,
    ``window = 32`` and ``r = 64`` this is ``k_out = 1`` (524,288 parameters, LoRA's exactly).
    When even ``k_out = 1`` stays under the budget (small layers), ``k_out = 1`` is returned:
    the adapter is then smaller than the LoRA it is compared with, and the caller reports it.
    ``reserved`` parameters of the layer's other trainable parts (a learned-scale update) come
    off the budget first.
    """
    budget = lora_parameter_count(d_in, d_out, budget_rank) - reserved
    for k_out in range(1, d_out + 1):
        if d_out % k_out == 0 and qablora_parameter_count(d_in, d_out, pool_window, k_out) <= budget:
            return k_out
    return d_out
