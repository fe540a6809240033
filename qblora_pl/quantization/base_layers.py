"""One view over the frozen base linear layers that adapter strategies wrap.

A base layer is one of: a plain ``nn.Linear`` (16/32-bit), a bitsandbytes ``Linear4bit``
(NF4 / FP4, docs/method.md section 1), a :class:`TorchaoNF4Linear` (NF4 on torchao's ``NF4Tensor``,
shardable by FSDP2), or our :class:`GroupwiseIntLinear` (INT-b with one scale and one offset per
group, docs/method.md section 3). Strategies never touch the quantized storage
directly: they ask this module for the shape and for ``W_hat = dequant(Q(W))``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from qblora_pl.quantization.int_layer import GroupwiseIntLinear
from qblora_pl.quantization.torchao_nf4 import TorchaoNF4Linear

try:  # bitsandbytes is a hard dependency, but keep the import failure readable.
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    _BNB_LINEAR4BIT: tuple[type, ...] = (bnb.nn.Linear4bit,)
except ImportError:  # pragma: no cover - exercised only without bitsandbytes
    _BNB_LINEAR4BIT = ()

BASE_LINEAR_TYPES: tuple[type, ...] = (nn.Linear, GroupwiseIntLinear, TorchaoNF4Linear, *_BNB_LINEAR4BIT)


def is_base_linear(module: nn.Module) -> bool:
    """True for every layer type an adapter strategy can wrap."""
    return isinstance(module, BASE_LINEAR_TYPES)


def is_nf4_linear(module: nn.Module) -> bool:
    """True for a bitsandbytes 4-bit layer (torchao's NF4 layers: :func:`is_torchao_nf4_linear`)."""
    return bool(_BNB_LINEAR4BIT) and isinstance(module, _BNB_LINEAR4BIT)


def is_torchao_nf4_linear(module: nn.Module) -> bool:
    return isinstance(module, TorchaoNF4Linear)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(d_out, d_in)`` of a base linear layer, whatever its storage."""
    if isinstance(module, GroupwiseIntLinear):
        return module.out_features, module.in_features
    if is_nf4_linear(module) or isinstance(module, TorchaoNF4Linear):
        return module.out_features, module.in_features
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    raise TypeError(f"{type(module).__name__} is not a supported base linear layer")


def describe_base(module: nn.Module) -> str:
    """Short human-readable name of the base's storage, used in errors and summaries."""
    if isinstance(module, GroupwiseIntLinear):
        return f"INT{module.bits} g{module.group_size}"
    if is_nf4_linear(module):
        quant_type = getattr(module.weight, "quant_type", "nf4")
        return f"bnb {quant_type.upper()}"
    if isinstance(module, TorchaoNF4Linear):
        return "torchao NF4"
    return f"dense {module.weight.dtype}".replace("torch.", "")


@torch.no_grad()
def dequantized_weight(module: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``W_hat``: the weight the base layer actually computes with, ``(d_out, d_in)``."""
    if isinstance(module, GroupwiseIntLinear):
        weight = module.dequantize()
    elif is_nf4_linear(module):
        weight = _dequantize_nf4(module)
    elif isinstance(module, TorchaoNF4Linear):
        weight = module.dequantize()
    elif isinstance(module, nn.Linear):
        weight = module.weight.detach()
    else:
        raise TypeError(f"{type(module).__name__} is not a supported base linear layer")
    return weight if dtype is None else weight.to(dtype)


def keep_nf4_layers_trainable(model: nn.Module) -> int:
    """Make every bitsandbytes 4-bit layer of ``model`` compute through its autograd path.

    On CPUs with AVX512-BF16, bitsandbytes' ``Linear4bit`` rewrites its weight in place into a
    kernel layout on the first eval-mode forward whose input does not require grad (Lightning's
    sanity check, every validation) and from then on computes every forward - training ones
    too - with ``gemv_4bit``, which has no autograd kernel: the gradient through the frozen base
    is silently dropped, and the eval forwards themselves are computed in bf16. Here the
    repacking is switched off, any layer already repacked is restored to the canonical layout,
    and a forward pre-hook restores it should anything repack it later. Training and
    evaluation then compute the same function with correct gradients whatever ran before.
    Idempotent; returns the number of 4-bit layers seen.
    """
    count = 0
    for module in model.modules():
        if not is_nf4_linear(module):
            continue
        count += 1
        module.support_avx512bf16_for_cpu = False
        _restore_canonical_nf4_layout(module)
        if not getattr(module, "_qblora_layout_hook", False):
            module.register_forward_pre_hook(_nf4_layout_pre_hook)
            module._qblora_layout_hook = True
    return count


def _nf4_layout_pre_hook(module: nn.Module, args: tuple) -> None:
    _restore_canonical_nf4_layout(module)


def _restore_canonical_nf4_layout(module: nn.Module) -> None:
    weight = module.weight
    state = getattr(weight, "quant_state", None)
    if state is not None and getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
        if getattr(module, "quant_state", None) is not None:
            module.quant_state = weight.quant_state


def _dequantize_nf4(module: nn.Module) -> torch.Tensor:
    """Dequantize a bnb 4-bit layer, whichever storage layout it is in right now.

    On CPUs with AVX512-BF16, bitsandbytes rewrites a ``Linear4bit``'s weight in place into a
    kernel layout on its first eval-mode, no-grad forward (e.g. validation) and marks the quant
    state ``packing_format_for_cpu``; ``dequantize_4bit`` does not read that layout. Undo it on
    a copy of the state (bitsandbytes' inverse mutates the state it is given), leaving the
    layer as it is.
    """
    data, state = module.weight.data, module.weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        data, state = _convert_weight_packed_for_cpu_inverse(data, copy.deepcopy(state))
    return dequantize_4bit(data, state)


def logical_numel(module: nn.Module) -> int:
    """Number of weights a layer represents (packed 4-bit storage holds two per byte)."""
    if isinstance(module, (GroupwiseIntLinear, TorchaoNF4Linear)) or is_nf4_linear(module):
        d_out, d_in = linear_shape(module)
        bias = getattr(module, "bias", None)
        return d_out * d_in + (bias.numel() if bias is not None else 0)
    return sum(p.numel() for p in module.parameters(recurse=False))
