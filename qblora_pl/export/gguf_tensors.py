"""GGUF tensor encoding of a merged Llama: exact Q4_1 layers, dense tensors, the q/k row permutation.

Why GGUF Q4_1 is the natural target for QA-LoRA / QA-BLoRA: a Q4_1 block is 32 weights with
``w = d * q + m`` (``d``, ``m`` fp16, ``q`` 4-bit codes 0..15) - the same form as our INT-b base,
``W = scale[G] * q + offset[G]`` (docs/method.md section 5). INT2 / INT3 / INT4 codes (0..3, 0..7,
0..15) are all Q4_1 codes, and a group of 32, 64 or 128 maps onto 1, 2 or 4 consecutive Q4_1
blocks that share ``d = scale`` and ``m = offset``. The codes are copied; the only loss is
rounding the merged (float32) offsets - and non-fp16 scales - to fp16, which is measured.

Byte layout (ggml ``ggml/src/ggml-common.h``)::

    typedef struct { ggml_half d; ggml_half m; uint8_t qs[QK4_1 / 2]; } block_q4_1;  // QK4_1 = 32

``qs[j]`` holds ``q[j]`` in its low nibble and ``q[j + 16]`` in its high nibble. The test suite
checks :func:`pack_q4_1` bit for bit against ``gguf.quants.dequantize``.

Layers that cannot be Q4_1 exactly (a dense LoRA / Q-BLoRA merge, an NF4 base, INT8 codes, a
group size that is not a multiple of 32) take the ``fallback``: ``"f16"`` (the dense weight
rounded to fp16) or ``"requantize_q4_1"`` (round-to-nearest Q4_1 of the dense weight); an
:class:`ExportFallbackWarning` names the layers, why, and the measured error.

The token embedding (and an untied ``output``) is kept compact: under ``dense_type="auto"`` it
keeps the source GGUF file's bytes and type when the model was converted from one and the
values are exactly that tensor's dequantization, else it is Q8_0 when Q8_0 holds it losslessly,
else F16.

Like llama.cpp's ``convert_hf_to_gguf.py`` (``LlamaModel.modify_tensors``), the rows of
``q_proj`` / ``k_proj`` are permuted from Hugging Face's rotate-half RoPE layout to the
interleaved layout llama.cpp uses. Permuting output rows keeps every row's blocks intact, so a
Q4_1 tensor is permuted by permuting the rows of its codes, scales and offsets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from qblora_pl.export.snapshot import FROZEN_DENSE, LinearSnapshot, QuantizedParts

QK4_1 = 32  # weights per Q4_1 block
Q4_1_BLOCK_BYTES = 20  # fp16 d + fp16 m + 16 bytes of nibbles
Q4_1_MAX_BITS = 4  # codes 0..15: INT2, INT3 and INT4 codes all fit
#: The tensors "auto" keeps compact (the source GGUF's type or Q8_0 when lossless, else F16).
EMBEDDING_TENSORS = ("token_embd.weight", "output.weight")


# --------------------------------------------------------------------------------------------
# Q4_1 packing and the llama.cpp q/k permutation
# --------------------------------------------------------------------------------------------


def llama_permute_rows(weights: Tensor, n_head: int, n_head_kv: int | None = None) -> Tensor:
    """``convert_hf_to_gguf.py``'s ``LlamaModel.permute``: reorder rows within each head.

    Within a head of ``head_dim`` rows, HF pairs row ``i`` with row ``i + head_dim/2`` for RoPE;
    llama.cpp pairs rows ``2i`` and ``2i + 1``. Works on any tensor whose first dimension is
    the output rows (weights, biases, Q4_1 codes / scales / offsets).
    """
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def llama_unpermute_rows(weights: Tensor, n_head: int, n_head_kv: int | None = None) -> Tensor:
    """Inverse of :func:`llama_permute_rows` (llama.cpp layout back to Hugging Face's)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, weights.shape[0] // n_head // 2, 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def pack_q4_1(codes: Tensor, d: Tensor, m: Tensor) -> np.ndarray:
    """Pack 4-bit codes ``(rows, n)`` and per-block fp16 ``d``, ``m`` ``(rows, n / 32)`` into Q4_1.

    Returns ``uint8`` ``(rows, n / 32 * 20)``: per block ``d`` (2 bytes, little-endian), ``m``
    (2 bytes), then ``qs[j] = q[j] | q[j + 16] << 4`` for ``j < 16``.
    """
    rows, n = codes.shape
    if n % QK4_1 != 0:
        raise ValueError(f"Q4_1 needs rows of a multiple of {QK4_1} weights, got {n}")
    if codes.dtype != torch.uint8 or int(codes.max()) > 15:
        raise ValueError("Q4_1 codes must be uint8 values in 0..15")
    n_blocks = n // QK4_1
    for label, t in (("d", d), ("m", m)):
        if tuple(t.shape) != (rows, n_blocks) or t.dtype != torch.float16:
            raise ValueError(f"Q4_1 {label} must be float16 of shape {(rows, n_blocks)}, got {t.dtype} {tuple(t.shape)}")
    q = codes.reshape(rows, n_blocks, QK4_1)
    qs = q[..., : QK4_1 // 2] | (q[..., QK4_1 // 2 :] << 4)
    dm = torch.stack([d, m], dim=-1).contiguous().view(torch.uint8)  # (rows, n_blocks, 4)
    blocks = torch.cat([dm, qs], dim=-1)
    return blocks.reshape(rows, n_blocks * Q4_1_BLOCK_BYTES).numpy()


def q4_1_inexact_reason(parts: QuantizedParts) -> str | None:
    """Why an INT-b layer has no exact Q4_1 form, or None when it has one."""
    if parts.bits > Q4_1_MAX_BITS:
        return f"INT{parts.bits} codes (0..{2**parts.bits - 1}) do not fit Q4_1's 4-bit codes (0..15)"
    if parts.group_size % QK4_1 != 0:
        return (f"group_size={parts.group_size} is not a multiple of the Q4_1 block size {QK4_1} "
                "(a block would need two scales)")
    return None


def q4_1_exact_parts(parts: QuantizedParts) -> tuple[Tensor, Tensor, Tensor] | None:
    """Codes and per-32-block fp16 ``d``, ``m`` of an INT2/3/4 layer with a group size of 32k,
    or None when the layer has no exact Q4_1 form (:func:`q4_1_inexact_reason`).

    A group of ``g = 32k`` weights becomes ``k`` consecutive blocks with the group's scale and
    offset; b-bit codes (b <= 4) are Q4_1 codes as they are.
    """
    if q4_1_inexact_reason(parts) is not None:
        return None
    per_group = parts.group_size // QK4_1
    d = parts.scales.float().repeat_interleave(per_group, dim=1).to(torch.float16)
    m = parts.offsets.float().repeat_interleave(per_group, dim=1).to(torch.float16)
    return parts.codes, d, m



def _linear_to_gguf(linear: LinearSnapshot, permute, fallback: str, dense_type: str, compact: bool = False,
                    source=None):
    """One linear layer's GGUF array, raw type and report entry (exact Q4_1, dense, or fallback).

    ``compact``: the layer is the (untied) ``output`` and follows the embedding rule of
    :func:`_dense_array` (``source``: the source GGUF's tensor of that name)."""
    import gguf

    info: dict[str, Any] = {"origin": linear.origin}
    if linear.is_quantized:
        info["source"] = f"INT{linear.quantized.bits} g{linear.quantized.group_size}"
    else:
        info["source"] = linear.origin
    exact = q4_1_exact_parts(linear.quantized) if linear.is_quantized else None
    if exact is not None:
        codes, d, m = exact
        reference = linear.quantized.dequantize()
        per_group = linear.quantized.group_size // QK4_1
        m_true = linear.quantized.offsets.float().repeat_interleave(per_group, dim=1)
        d_true = linear.quantized.scales.float().repeat_interleave(per_group, dim=1)
        rebuilt = GroupwiseQ41View(codes, d, m).dequantize()
        info.update(
            gguf_type="Q4_1",
            max_abs_offset_rounding=float((m.float() - m_true).abs().max()),
            max_abs_scale_rounding=float((d.float() - d_true).abs().max()),
            max_abs_weight_error=float((rebuilt - reference).abs().max()),
            relative_weight_error=_relative(rebuilt, reference),
        )
        array = pack_q4_1(permute(codes), permute(d), permute(m))
        return info, array, gguf.GGMLQuantizationType.Q4_1

    weight = linear.dense_weight()
    if linear.origin == FROZEN_DENSE and not linear.is_quantized:
        array, raw_type = _dense_array(permute(linear.weight), dense_type, compact=compact, source=source)
        report = _dense_report(array, raw_type, permute(linear.weight))
        info.update(gguf_type=report["gguf_type"], max_abs_weight_error=report["max_abs_error"],
                    relative_weight_error=report["relative_error"])
        return info, array, raw_type

    info["fallback"] = fallback
    info["fallback_reason"] = (q4_1_inexact_reason(linear.quantized) if linear.is_quantized
                               else "a dense weight is on no Q4_1 grid")
    source = permute(weight)
    if fallback == "f16":
        _check_fits_f16(linear.name, source)
        array = source.to(torch.float16).numpy()
        rebuilt = torch.from_numpy(array.astype(np.float32))
        raw_type = None
        info["gguf_type"] = "F16"
    else:
        if linear.d_in % QK4_1 != 0:
            raise ValueError(f"layer {linear.name}: d_in={linear.d_in} is not divisible by the Q4_1 block size {QK4_1}")
        array = gguf.quants.quantize(source.numpy(), gguf.GGMLQuantizationType.Q4_1)
        rebuilt = torch.from_numpy(gguf.quants.dequantize(array, gguf.GGMLQuantizationType.Q4_1).copy())
        raw_type = gguf.GGMLQuantizationType.Q4_1
        info["gguf_type"] = "Q4_1"
    info.update(
        max_abs_weight_error=float((rebuilt - source).abs().max()),
        relative_weight_error=_relative(rebuilt, source),
    )
    return info, array, raw_type


class GroupwiseQ41View:
    """What llama.cpp computes from a Q4_1 tensor: ``w = d * q + m`` per block of 32."""

    def __init__(self, codes: Tensor, d: Tensor, m: Tensor) -> None:
        self.codes, self.d, self.m = codes, d, m

    def dequantize(self) -> Tensor:
        rows, n = self.codes.shape
        q = self.codes.float().reshape(rows, n // QK4_1, QK4_1)
        w = q * self.d.float().unsqueeze(-1) + self.m.float().unsqueeze(-1)
        return w.reshape(rows, n)


def _dense_array(tensor: Tensor, dense_type: str, compact: bool = False, source=None) -> tuple[np.ndarray, Any]:
    """A non-Q4_1, non-norm tensor as (array, raw GGML type or None for a plain float array).

    ``compact`` (the token embedding, an untied ``output``) under ``"auto"``: the bytes of
    ``source`` (the same tensor of the GGUF file the model was converted from, any type but
    F32) when they dequantize to exactly these values - a frozen embedding keeps the source's
    type, K-quants included; else Q8_0 when Q8_0 holds the values exactly
    (``dequantize(quantize(x)) == x``); else F16. BF16 and F16 tensors keep their type.
    """
    import gguf

    if dense_type == "q8_0":
        return _q8_0(tensor)
    if dense_type == "auto" and compact and tensor.dtype == torch.float32:
        if source is not None and _is_dequantized(tensor, source):
            return np.array(source.data, copy=True), source.tensor_type
        packed = _q8_0(tensor, only_if_lossless=True)
        return packed if packed is not None else _dense_array(tensor, "f16")
    if dense_type == "f32" or (dense_type == "auto" and tensor.dtype == torch.float32):
        return tensor.float().numpy(), None
    if dense_type == "f16" or (dense_type == "auto" and tensor.dtype == torch.float16):
        _check_fits_f16("dense tensor", tensor)
        return tensor.to(torch.float16).numpy(), None
    if dense_type == "auto" and tensor.dtype == torch.bfloat16:
        # bf16 -> f32 -> bf16 is lossless; gguf's BF16 packer gives the raw bytes.
        return gguf.quants.quantize(tensor.float().numpy(), gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16
    if dense_type == "auto":
        return tensor.float().numpy(), None
    raise ValueError(f"dense_type {dense_type!r} must be 'auto', 'f32', 'f16' or 'q8_0'")


def _source_gguf_tensors(tokenizer_source: str | Path) -> dict[str, Any]:
    """The embedding / output tensors of the ``.gguf`` file the model directory was converted
    from (:func:`qblora_pl.sources.converted_from_gguf`), by GGUF name; {} for any other source."""
    import gguf

    from qblora_pl.sources import converted_from_gguf

    path = converted_from_gguf(tokenizer_source)
    if path is None:
        return {}
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors if t.name in EMBEDDING_TENSORS}


def _is_dequantized(tensor: Tensor, source) -> bool:
    """Whether ``tensor`` is exactly the dequantization of the GGUF tensor ``source`` (not F32)."""
    import gguf

    shape = tuple(int(n) for n in reversed(source.shape.tolist()))
    if source.tensor_type == gguf.GGMLQuantizationType.F32 or shape != tuple(tensor.shape):
        return False
    try:
        values = gguf.quants.dequantize(np.asarray(source.data), source.tensor_type).reshape(shape)
    except NotImplementedError:  # a type the gguf package cannot dequantize: not provably equal
        return False
    return bool(np.array_equal(values.astype(np.float32), tensor.float().numpy()))


def _q8_0(tensor: Tensor, only_if_lossless: bool = False):
    """Q8_0 (``w = d * q``, int8 ``q``, fp16 ``d`` per 32) of a 2-D tensor; None when
    ``only_if_lossless`` and Q8_0 would change a value (or the rows are not 32k long)."""
    import gguf

    q8_0 = gguf.GGMLQuantizationType.Q8_0
    values = np.ascontiguousarray(tensor.float().numpy())
    if values.shape[-1] % QK4_1 != 0:
        if only_if_lossless:
            return None
        raise ValueError(f"Q8_0 needs rows of a multiple of {QK4_1} values, got a tensor of shape {tuple(values.shape)}")
    packed = gguf.quants.quantize(values, q8_0)
    if only_if_lossless and not np.array_equal(gguf.quants.dequantize(packed, q8_0), values):
        return None
    return packed, q8_0


def _dense_report(array: np.ndarray, raw_type, source: Tensor) -> dict[str, Any]:
    """The GGUF type of a dense tensor and how far its stored values are from ``source``."""
    import gguf

    stored = array.astype(np.float32) if raw_type is None else gguf.quants.dequantize(array, raw_type)
    rebuilt = torch.from_numpy(np.ascontiguousarray(stored, dtype=np.float32)).reshape(source.shape)
    return {
        "gguf_type": _type_name(array, raw_type),
        "shape": list(source.shape),
        "max_abs_error": float((rebuilt - source.float()).abs().max()),
        "relative_error": _relative(rebuilt, source.float()),
    }


def _type_name(array: np.ndarray, raw_type) -> str:
    if raw_type is not None:
        return raw_type.name
    return {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16"}[array.dtype]


def _check_fits_f16(name: str, tensor: Tensor) -> None:
    top = float(tensor.float().abs().max()) if tensor.numel() else 0.0
    if top > torch.finfo(torch.float16).max:
        raise FloatingPointError(f"layer {name}: max |w| = {top:.4g} overflows float16; export aborted")


def _relative(approx: Tensor, exact: Tensor) -> float:
    return float((approx - exact).norm() / exact.norm().clamp_min(1e-12))
