"""NF4 bases on torchao's ``NF4Tensor``: QLoRA's 4-bit NormalFloat weight that FSDP2 can shard.

bitsandbytes keeps a 4-bit layer's quantization state (block scales, double-quantization
constants) outside the tensor FSDP2 shards, so a bitsandbytes NF4 base cannot be sharded
(``qblora_pl.distributed`` refuses it). torchao's ``NF4Tensor`` is one tensor subclass that
carries all of it - the packed 4-bit codes, the int8 block scales and their per-scaler-block
float factors - and implements the ops ``torch.distributed.fsdp.fully_shard`` needs (chunk,
all-gather), so each rank holds ``1 / world_size`` of the codes *and* of the scales. This is the
route torchtune takes (``FrozenNF4Linear`` / ``linear_nf4``).

The format (torchao 0.18, ``NF4Tensor.from_tensor``):

* the weight, flattened row-major, is cut into blocks of ``block_size`` = 64 weights; each
  weight is the nearest of the 16 NF4 levels times its block's absmax ``s_b``;
* double quantization: ``s_b - mean(s)`` is quantized to int8 with one float factor per
  ``scaler_block_size`` consecutive blocks (torchao's default 256), ``mean(s)`` kept as a scalar;
* ``W_hat = NF4[q] * (int8_b / factor_B + mean(s))``, computed in the dtype the weight was
  quantized from (float32 on CPU, bfloat16 on GPU: :mod:`qblora_pl.quantization.backends`).

That is the same recipe as bitsandbytes' NF4 with double quantization, but not the same bits:
torchao rounds the NF4 levels to 4 decimals, picks the nearest level by distance, and quantizes
the scales symmetrically around their mean (bitsandbytes: its dynamic 8-bit map). Each backend
is self-consistent - the training forward computes with exactly the ``W_hat`` that merges and
exports read (:meth:`TorchaoNF4Linear.dequantize`) - and ``tests/quantization/test_nf4_torchao.py``
measures how far the two ``W_hat`` are apart (docs/fsdp.md has the numbers).

**Per-layer scaler block.** ``NF4Tensor`` needs the number of blocks ``d_out * d_in / 64`` to be
a multiple of the scaler block, and FSDP2 needs the number of scaler blocks to be a multiple of
the world size (each rank's shard must hold whole scaler blocks). A layer whose block count the
configured ``scaler_block_size`` does not divide (e.g. SmolLM2's 192 x 576 ``k_proj``) uses the
largest power of two below it that does (:func:`scaler_block_size_for`); the choice depends only
on the layer's shape, never on the world size, so every world size trains and exports the same
``W_hat``. :func:`shard_problem` names a layer that a world size cannot shard and the smaller
``scaler_block_size`` that would let it.

torchao is an optional dependency (``pip install 'qblora-pl[fsdp-nf4]'``); this module imports it
only when a layer is built or run, so importing it costs nothing without torchao.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "DEFAULT_SCALER_BLOCK_SIZE",
    "TorchaoNF4Linear",
    "nf4_storage_bytes",
    "quantize_linear_layers_nf4",
    "scaler_block_size_for",
    "shard_problem",
    "torchao_nf4",
]

#: Weights per NF4 block (QLoRA's, bitsandbytes' and torchao's).
DEFAULT_BLOCK_SIZE = 64
#: Blocks per double-quantization factor (torchao's default).
DEFAULT_SCALER_BLOCK_SIZE = 256


@functools.lru_cache(maxsize=None)  # an import that failed is not cached: it raises again
def torchao_nf4() -> tuple[type, Any, Any]:
    """``(NF4Tensor, to_nf4, linear_nf4)`` from torchao, with a readable error without it.

    torchao 0.18 exports them from ``torchao.quantization``; older releases from
    ``torchao.dtypes.nf4tensor``. torchao logs a warning per CUDA extension it cannot load on a
    CPU-only torch; those are silenced (NF4 uses none of them).
    """
    logger = logging.getLogger("torchao")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        try:
            from torchao.quantization import NF4Tensor, to_nf4
            from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4
        except ImportError:
            from torchao.dtypes.nf4tensor import NF4Tensor, linear_nf4, to_nf4
    except ImportError as error:
        raise ImportError(
            "NF4(implementation='torchao') needs torchao (tested with 0.18.0): "
            "pip install 'qblora-pl[fsdp-nf4]' or pip install torchao==0.18.0"
        ) from error
    finally:
        logger.setLevel(level)
    return NF4Tensor, to_nf4, linear_nf4


def scaler_block_size_for(numel: int, block_size: int = DEFAULT_BLOCK_SIZE, max_scaler_block_size: int = DEFAULT_SCALER_BLOCK_SIZE) -> int:
    """The scaler block a weight of ``numel`` values uses: the largest power of two that is at
    most ``max_scaler_block_size`` and divides its number of blocks ``numel / block_size``."""
    if numel % block_size != 0:
        raise ValueError(f"{numel} weights are not a whole number of NF4 blocks of {block_size}")
    n_blocks = numel // block_size
    return math.gcd(n_blocks, 1 << (max_scaler_block_size.bit_length() - 1))


class TorchaoNF4Linear(nn.Module):
    """A frozen linear layer whose weight is a torchao ``NF4Tensor`` (``y = x W_hat^T + b``).

    The weight is an ``nn.Parameter`` (``requires_grad=False``) so that FSDP2 shards it like any
    parameter; the forward is torchao's ``linear_nf4``, which dequantizes to the input's dtype and
    whose backward gives the input gradient ``dy W_hat`` (the adapters need it) and none for the
    weight. ``bias`` (absent in Llama) stays a frozen float parameter.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    @torch.no_grad()
    def from_linear(
        cls,
        linear: nn.Linear,
        block_size: int = DEFAULT_BLOCK_SIZE,
        max_scaler_block_size: int = DEFAULT_SCALER_BLOCK_SIZE,
        name: str = "",
    ) -> "TorchaoNF4Linear":
        """Quantize ``linear``'s weight to NF4 in its own dtype and on its own device."""
        _, to_nf4, _ = torchao_nf4()
        weight = linear.weight.detach().contiguous()
        if weight.numel() % block_size != 0:
            raise ValueError(
                f"layer {name or '?'}: {weight.shape[0]} x {weight.shape[1]} = {weight.numel()} weights are not "
                f"a multiple of the NF4 block size {block_size}"
            )
        scaler_block = scaler_block_size_for(weight.numel(), block_size, max_scaler_block_size)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(to_nf4(weight, block_size, scaler_block), bias)

    # ------------------------------------------------------------------ format
    @property
    def block_size(self) -> int:
        return self._nf4_local().block_size

    @property
    def scaler_block_size(self) -> int:
        return self._nf4_local().scaler_block_size

    @property
    def n_scaler_blocks(self) -> int:
        """Double-quantization factors of the whole weight (FSDP2 splits them over the ranks)."""
        return self.out_features * self.in_features // (self.block_size * self.scaler_block_size)

    def _nf4_local(self) -> Tensor:
        """The ``NF4Tensor`` this rank holds (its shard under FSDP2)."""
        from torch.distributed.tensor import DTensor

        weight = self.weight
        return weight.to_local() if isinstance(weight, DTensor) else weight

    # ------------------------------------------------------------------ compute
    def forward(self, x: Tensor) -> Tensor:
        _, _, linear_nf4 = torchao_nf4()
        out = linear_nf4(x, self.weight)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    @torch.no_grad()
    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """``W_hat`` (``d_out x d_in``): exactly what :meth:`forward` multiplies by.

        ``linear_nf4`` computes ``weight.to(x.dtype)``, i.e. ``W_hat`` in the quantization dtype
        cast to the input's; this returns ``W_hat`` in the quantization dtype (or cast to
        ``dtype``). Not available while FSDP2 holds the weight sharded: merges and exports of a
        sharded run go through an unsharded copy (``qblora_pl.distributed.unsharded_copy``).
        """
        from torch.distributed.tensor import DTensor

        if isinstance(self.weight, DTensor):
            raise RuntimeError(
                "TorchaoNF4Linear.dequantize: the weight is sharded by FSDP2; dequantize an unsharded copy "
                "(qblora_pl.distributed.unsharded_copy)"
            )
        weight = self.weight.get_original_weight()
        return weight if dtype is None else weight.to(dtype)

    def extra_repr(self) -> str:
        local = self._nf4_local()
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"block_size={local.block_size}, scaler_block_size={local.scaler_block_size}, dtype={local.dtype}"
        )


def nf4_storage_bytes(tensor: Tensor) -> int:
    """Bytes an ``NF4Tensor`` really holds: codes, int8 scales, factors, the mean and the 16 levels.

    ``numel() * element_size()`` would count the dense float tensor it stands for.
    """
    names, _ = tensor.__tensor_flatten__()
    return sum(getattr(tensor, name).numel() * getattr(tensor, name).element_size() for name in names)


def is_nf4_tensor(tensor: Tensor) -> bool:
    """True for a torchao ``NF4Tensor`` (without importing torchao when it is not loaded)."""
    import sys

    if not any(name.startswith("torchao") for name in sys.modules):
        return False
    NF4Tensor, _, _ = torchao_nf4()
    return isinstance(tensor, NF4Tensor)


@torch.no_grad()
def quantize_linear_layers_nf4(
    model: nn.Module,
    skip: tuple[str, ...] = ("lm_head",),
    block_size: int = DEFAULT_BLOCK_SIZE,
    max_scaler_block_size: int = DEFAULT_SCALER_BLOCK_SIZE,
) -> dict[str, int]:
    """Swap every ``nn.Linear`` of ``model`` except ``skip`` for a :class:`TorchaoNF4Linear`, in place.

    Like bitsandbytes through transformers: the output head stays in high precision. Returns the
    scaler block size each swapped layer uses, by qualified name.
    """
    chosen = {}
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is not nn.Linear or child_name in skip:
                continue
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            layer = TorchaoNF4Linear.from_linear(child, block_size, max_scaler_block_size, name=name)
            setattr(parent, child_name, layer)
            chosen[name] = layer.scaler_block_size
    return chosen


def shard_problem(name: str, layer: TorchaoNF4Linear, world_size: int) -> str | None:
    """Why FSDP2 cannot shard ``layer`` over ``world_size`` ranks, or None when it can.

    FSDP2 splits a weight into ``world_size`` row blocks; an ``NF4Tensor`` splits its codes, its
    int8 scales and its double-quantization factors alike, so the rows (``d_out``) and the scaler
    blocks (``d_out * d_in / (block_size * scaler_block_size)``) must both divide by the world size.
    """
    d_out, d_in = layer.out_features, layer.in_features
    n_blocks = d_out * d_in // layer.block_size
    n_scaler = layer.n_scaler_blocks
    if d_out % world_size == 0 and n_scaler % world_size == 0:
        return None
    message = (
        f"layer {name}: its torchao NF4 weight ({d_out} x {d_in}: {n_blocks} blocks of {layer.block_size}, "
        f"{n_scaler} double-quantization factor(s) of scaler_block_size={layer.scaler_block_size} blocks) "
        f"cannot be sharded by FSDP2 over world size {world_size}: "
    )
    if d_out % world_size != 0:
        return message + f"its {d_out} rows are not divisible by {world_size}. Use a world size that divides {d_out}"
    fits = [s for s in (128, 64, 32, 16, 8, 4, 2, 1) if s < layer.scaler_block_size and n_blocks % s == 0
            and (n_blocks // s) % world_size == 0]
    hint = (
        f"Set model.quantization.init_args.scaler_block_size: {fits[0]} (or lower; a layer whose block count "
        f"a scaler block does not divide uses the largest power of two below it that does)"
        if fits else "No scaler block size makes it divide"
    )
    return message + f"{n_scaler} factor(s) are not divisible by {world_size}. {hint}, or use a world size that divides {n_scaler}"
