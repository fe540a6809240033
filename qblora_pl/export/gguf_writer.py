"""Write a merged Llama model as a GGUF file that llama.cpp runs.

Why GGUF Q4_1 is the natural target for QA-LoRA / QA-BLoRA: a Q4_1 block is 32 weights with
``w = d * q + m`` (``d``, ``m`` fp16, ``q`` 4-bit codes 0..15) - the same form as our INT-b base,
``W = scale[G] * q + offset[G]`` (METHOD.md section 5). INT2 / INT3 / INT4 codes (0..3, 0..7,
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
else F16. The tokenizer settings llama.cpp needs beyond the vocabulary (``tokenizer.ggml.pre``,
add-BOS / add-EOS, the chat template) come from the source ``.gguf`` file when the model was
converted from one (:func:`qblora_pl.sources.converted_from_gguf`), else they are derived from
the Hugging Face tokenizer as ``convert_hf_to_gguf.py`` does (:func:`tokenizer_settings`).

Like llama.cpp's ``convert_hf_to_gguf.py`` (``LlamaModel.modify_tensors``), the rows of
``q_proj`` / ``k_proj`` are permuted from Hugging Face's rotate-half RoPE layout to the
interleaved layout llama.cpp uses. Permuting output rows keeps every row's blocks intact, so a
Q4_1 tensor is permuted by permuting the rows of its codes, scales and offsets.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from qblora_pl.export.atomic import atomic_file
from qblora_pl.export.snapshot import (
    FROZEN_DENSE,
    ExportFallbackWarning,
    LinearSnapshot,
    ModelSnapshot,
    QuantizedParts,
)
from qblora_pl.export.tokenizer_files import sentencepiece_model_path

QK4_1 = 32  # weights per Q4_1 block
Q4_1_BLOCK_BYTES = 20  # fp16 d + fp16 m + 16 bytes of nibbles
Q4_1_MAX_BITS = 4  # codes 0..15: INT2, INT3 and INT4 codes all fit
GGUFFallback = Literal["f16", "requantize_q4_1"]
DenseType = Literal["auto", "f32", "f16", "q8_0"]
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


# --------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------


def write_gguf(
    snapshot: ModelSnapshot,
    path: str | Path,
    tokenizer_source: str | Path,
    *,
    fallback: GGUFFallback = "f16",
    dense_type: DenseType = "auto",
    name: str = "qblora-export",
) -> dict[str, Any]:
    """Write ``snapshot`` (a merged Llama) to the GGUF file ``path`` (atomically).

    ``dense_type`` is the GGUF type of the tensors that are neither Q4_1 layers nor norms:
    ``"f32"``, ``"f16"`` or ``"q8_0"`` for all of them, or ``"auto"``: the token embedding and an
    untied ``output`` keep the source GGUF's type when the values are its dequantization, else
    become Q8_0 when Q8_0 holds them losslessly, else F16 (bfloat16 stays BF16); frozen dense
    layers keep their precision (F32 for float32, F16 for float16, BF16 for bfloat16). Norms
    are always F32 (ggml requires it). Tied embeddings stay tied (no ``output.weight``). Returns the per-layer types and measured weight errors for the report.
    """
    import gguf

    if fallback not in ("f16", "requantize_q4_1"):
        raise ValueError(f"gguf fallback {fallback!r} must be 'f16' or 'requantize_q4_1'")
    if dense_type not in ("auto", "f32", "f16", "q8_0"):
        raise ValueError(f"gguf dense_type {dense_type!r} must be 'auto', 'f32', 'f16' or 'q8_0'")
    config = snapshot.config
    if config.model_type != "llama":
        raise NotImplementedError(f"GGUF export supports model_type 'llama', got {config.model_type!r}")
    hp = _llama_hparams(config)

    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_name(name)
    writer.add_context_length(hp["context_length"])
    writer.add_embedding_length(hp["hidden"])
    writer.add_block_count(hp["n_layers"])
    writer.add_feed_forward_length(hp["intermediate"])
    writer.add_head_count(hp["n_head"])
    writer.add_head_count_kv(hp["n_head_kv"])
    writer.add_rope_freq_base(hp["rope_theta"])
    writer.add_rope_dimension_count(hp["head_dim"])
    if hp["head_dim"] != hp["hidden"] // hp["n_head"]:
        writer.add_key_length(hp["head_dim"])
        writer.add_value_length(hp["head_dim"])
    if hp["rope_scaling"] is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(hp["rope_scaling"])
    writer.add_layer_norm_rms_eps(hp["rms_eps"])
    writer.add_vocab_size(hp["vocab_size"])
    vocab = _add_vocab(writer, tokenizer_source, hp["vocab_size"])
    source_tensors = _source_gguf_tensors(tokenizer_source) if dense_type == "auto" else {}

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, hp["n_layers"])
    layers: dict[str, dict[str, Any]] = {}
    dense_tensors: dict[str, dict[str, Any]] = {}
    fallbacks: dict[str, dict[str, Any]] = {}
    entries: list[tuple[str, np.ndarray, Any]] = []

    def gguf_name(hf_key: str) -> str:
        mapped = name_map.get_name(hf_key, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise ValueError(f"tensor {hf_key} has no llama GGUF name; the model is not a plain Llama")
        return mapped

    def permutation(gname: str):
        if ".attn_q." in gname:
            return lambda t: llama_permute_rows(t, hp["n_head"], hp["n_head"])
        if ".attn_k." in gname:
            return lambda t: llama_permute_rows(t, hp["n_head"], hp["n_head_kv"])
        return lambda t: t

    for key, tensor in snapshot.others.items():
        if key == "lm_head.weight" and snapshot.tied_embeddings:
            continue
        gname = gguf_name(key)
        data = permutation(gname)(tensor)
        if data.dim() <= 1 or gname.endswith("_norm.weight"):
            entries.append((gname, data.float().numpy(), None))
        else:
            array, raw_type = _dense_array(data, dense_type, compact=gname in EMBEDDING_TENSORS,
                                           source=source_tensors.get(gname))
            dense_tensors[gname] = _dense_report(array, raw_type, data)
            entries.append((gname, array, raw_type))

    for layer_name, linear in snapshot.linears.items():
        if layer_name == "lm_head" and snapshot.tied_embeddings:
            continue
        gname = gguf_name(f"{layer_name}.weight")
        permute = permutation(gname)
        info, array, raw_type = _linear_to_gguf(linear, permute, fallback, dense_type, compact=gname in EMBEDDING_TENSORS,
                                                source=source_tensors.get(gname))
        layers[layer_name] = {"gguf_name": gname, **info}
        if info.get("fallback"):
            fallbacks[layer_name] = info
        entries.append((gname, array, raw_type))
        if linear.bias is not None:
            entries.append((gguf_name(f"{layer_name}.bias"), permute(linear.bias).float().numpy(), None))

    types = [e["gguf_type"] for e in layers.values()]
    if "Q4_1" in types:
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1)
    elif "F16" in types:
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    else:
        writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    for gname, array, raw_type in entries:
        writer.add_tensor(gname, np.ascontiguousarray(array), raw_dtype=raw_type)

    if fallbacks:
        worst = max(fallbacks, key=lambda n: fallbacks[n]["relative_weight_error"])
        kinds = sorted({f"{v['source']} -> {v['gguf_type']}: {v['fallback_reason']}" for v in fallbacks.values()})
        warnings.warn(
            f"GGUF export: {len(fallbacks)} layer(s) have no exact GGUF type and use the "
            f"'{fallback}' fallback ({'; '.join(kinds)}). Relative weight error: max "
            f"{fallbacks[worst]['relative_weight_error']:.4g} ({worst}). Exact Q4_1 needs an INT2, INT3 "
            f"or INT4 base with a group size that is a multiple of {QK4_1} and a QA-LoRA / QA-BLoRA merge.",
            ExportFallbackWarning,
            stacklevel=2,
        )

    path = Path(path)
    with atomic_file(path) as tmp:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    exact = [v for v in layers.values() if v["gguf_type"] == "Q4_1" and not v.get("fallback")]
    return {
        "path": str(path),
        "bytes": path.stat().st_size,
        "vocab": vocab,
        "layer_types": {t: types.count(t) for t in sorted(set(types))},
        "dense_tensors": dense_tensors,
        "exact_q4_1_layers": len(exact),
        "fallback_layers": sorted(fallbacks),
        "max_abs_offset_rounding": max((v["max_abs_offset_rounding"] for v in exact), default=None),
        "max_abs_scale_rounding": max((v["max_abs_scale_rounding"] for v in exact), default=None),
        "max_abs_weight_error_exact_layers": max((v["max_abs_weight_error"] for v in exact), default=None),
        "layers": layers,
    }


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


def _llama_hparams(config) -> dict[str, Any]:
    n_head = config.num_attention_heads
    n_head_kv = getattr(config, "num_key_value_heads", None) or n_head
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    scaling = None
    if rope_type == "linear":
        scaling = float(rope["factor"])
    elif rope_type != "default":
        raise NotImplementedError(f"GGUF export: rope_type {rope_type!r} is not supported (only default and linear)")
    return {
        "context_length": config.max_position_embeddings,
        "hidden": config.hidden_size,
        "n_layers": config.num_hidden_layers,
        "intermediate": config.intermediate_size,
        "n_head": n_head,
        "n_head_kv": n_head_kv,
        "head_dim": head_dim,
        "rope_theta": float(theta),
        "rope_scaling": scaling,
        "rms_eps": float(config.rms_norm_eps),
        "vocab_size": config.vocab_size,
    }


# --------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------


#: The text llama.cpp's ``convert_hf_to_gguf.py`` (``get_vocab_base_pre``) tokenizes to recognize
#: a byte-level BPE pre-tokenizer: sha256 of ``str(tokenizer.encode(text))`` names it.
BPE_FINGERPRINT_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) "
    "✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you "
    "sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
#: Fingerprints of a few common Llama-architecture tokenizers (values from ``convert_hf_to_gguf.py``).
KNOWN_BPE_PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Meta-Llama-3
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # openai-community/gpt2
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM / SmolLM2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5 / Qwen2
}
#: The tokenizer keys carried over from a source GGUF file (llama.cpp reads them at load time).
CARRIED_TOKENIZER_KEYS = {
    "pre": "tokenizer.ggml.pre",
    "add_bos": "tokenizer.ggml.add_bos_token",
    "add_eos": "tokenizer.ggml.add_eos_token",
    "add_space_prefix": "tokenizer.ggml.add_space_prefix",
    "chat_template": "tokenizer.chat_template",
}


def bpe_pre_tokenizer(tokenizer) -> tuple[str | None, str]:
    """llama.cpp's name for a Hugging Face BPE tokenizer's pre-tokenizer and its fingerprint
    (``convert_hf_to_gguf.py``'s method); the name is None when the fingerprint is unknown."""
    import hashlib

    fingerprint = hashlib.sha256(str(tokenizer.encode(BPE_FINGERPRINT_TEXT)).encode()).hexdigest()
    return KNOWN_BPE_PRE_TOKENIZERS.get(fingerprint), fingerprint


def tokenizer_settings(tokenizer_source: str | Path, tokenizer_model: Literal["gpt2", "llama"]) -> dict[str, Any]:
    """What llama.cpp needs besides the vocabulary: ``pre``, ``add_bos``, ``add_eos``,
    ``add_space_prefix`` (None: not written) and ``chat_template``, plus ``origin``.

    A directory converted from a ``.gguf`` file takes them from that file, so llama.cpp
    tokenizes the export as it tokenized the source. Otherwise they are derived like
    ``convert_hf_to_gguf.py``: ``pre`` from the BPE fingerprint (``"default"`` for
    SentencePiece and unknown fingerprints), add-BOS / add-EOS from ``tokenizer_config.json``
    or else from what the Hugging Face tokenizer does to a text, the chat template from
    ``tokenizer_config.json`` / ``chat_template.jinja``.
    """
    from qblora_pl.sources import converted_from_gguf

    source_gguf = converted_from_gguf(tokenizer_source)
    if source_gguf is not None:
        settings = _settings_from_gguf(source_gguf, tokenizer_model)
        if settings is not None:
            return settings
    return _derived_settings(Path(tokenizer_source), tokenizer_model)


def _settings_from_gguf(path: Path, tokenizer_model: str) -> dict[str, Any] | None:
    import gguf

    reader = gguf.GGUFReader(str(path))
    model_field = reader.get_field("tokenizer.ggml.model")
    if model_field is None or model_field.contents() != tokenizer_model:
        return None  # another tokenizer kind than the one we write: its settings would not apply
    settings: dict[str, Any] = {"origin": f"source GGUF {path}"}
    for name, key in CARRIED_TOKENIZER_KEYS.items():
        field = reader.get_field(key)
        settings[name] = None if field is None else field.contents()
    settings["pre"] = settings["pre"] or "default"
    return settings


def _derived_settings(directory: Path, tokenizer_model: str) -> dict[str, Any]:
    config_file = directory / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    template = config.get("chat_template")
    if template is None and (directory / "chat_template.jinja").is_file():
        template = (directory / "chat_template.jinja").read_text()
    settings: dict[str, Any] = {"origin": f"derived from {directory}", "chat_template": template}
    if tokenizer_model == "llama":
        # SentencePiece llamas: llama.cpp's default pre-tokenizer, BOS added unless configured off,
        # the space prefix of the SentencePiece model (convert_hf_to_gguf.py).
        spm_path = sentencepiece_model_path(directory)
        settings.update(
            pre="default",
            add_bos=bool(config.get("add_bos_token", True)),
            add_eos=bool(config.get("add_eos_token", False)),
            add_space_prefix=_spm_adds_dummy_prefix(spm_path) if spm_path is not None else None,
        )
        return settings

    from qblora_pl.sources import load_tokenizer

    tokenizer = load_tokenizer(str(directory))
    name, fingerprint = bpe_pre_tokenizer(tokenizer)
    if name is None:
        settings["origin"] += f" (BPE pre-tokenizer fingerprint {fingerprint[:12]} not recognized: 'default')"
    # What the tokenizer does to a text decides add-BOS / add-EOS unless the config states them.
    ids = tokenizer("a")["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    settings.update(
        pre=name or "default",
        pre_fingerprint=fingerprint,
        add_bos=bool(config.get("add_bos_token", bos is not None and ids[:1] == [bos])),
        add_eos=bool(config.get("add_eos_token", eos is not None and len(ids) > 1 and ids[-1] == eos)),
        add_space_prefix=None,
    )
    return settings


def _add_vocab(writer, tokenizer_source: str | Path, vocab_size: int) -> dict[str, Any]:
    """Write the tokenizer: llama's SentencePiece model if there is one, else a byte-level BPE."""
    spm_path = sentencepiece_model_path(tokenizer_source)
    if spm_path is not None:
        return _add_sentencepiece_vocab(writer, spm_path, Path(tokenizer_source), vocab_size)
    tokenizer_json = Path(tokenizer_source) / "tokenizer.json"
    if tokenizer_json.is_file():
        return _add_bpe_vocab(writer, tokenizer_json, vocab_size)
    raise FileNotFoundError(
        f"GGUF export needs the tokenizer: no tokenizer.model or tokenizer.json in {tokenizer_source!s}"
    )


def _write_settings(writer, settings: dict[str, Any]) -> dict[str, Any]:
    """Write the flags and chat template of :func:`tokenizer_settings`; return them for the report."""
    if settings["add_bos"] is not None:
        writer.add_add_bos_token(bool(settings["add_bos"]))
    if settings["add_eos"] is not None:
        writer.add_add_eos_token(bool(settings["add_eos"]))
    if settings["add_space_prefix"] is not None:
        writer.add_add_space_prefix(bool(settings["add_space_prefix"]))
    if settings["chat_template"]:
        writer.add_chat_template(settings["chat_template"])
    return {
        "settings_from": settings["origin"],
        "pre": settings["pre"],
        "add_bos": settings["add_bos"],
        "add_eos": settings["add_eos"],
        "chat_template": bool(settings["chat_template"]),
    }


def _add_sentencepiece_vocab(writer, spm_path: Path, source_dir: Path, vocab_size: int) -> dict[str, Any]:
    """Tokens, scores and types as in ``convert_hf_to_gguf.py``'s ``_create_vocab_sentencepiece``."""
    import gguf
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor(model_file=str(spm_path))
    n_sp = sp.vocab_size()
    if n_sp > vocab_size:
        raise ValueError(f"tokenizer.model has {n_sp} pieces but the model's vocab_size is {vocab_size}")
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [gguf.TokenType.UNUSED] * vocab_size
    for i in range(n_sp):
        tokens[i] = sp.id_to_piece(i).encode("utf-8")
        scores[i] = sp.get_score(i)
        if sp.is_unknown(i):
            types[i] = gguf.TokenType.UNKNOWN
        elif sp.is_control(i):
            types[i] = gguf.TokenType.CONTROL
        elif sp.is_unused(i):
            types[i] = gguf.TokenType.UNUSED
        elif sp.is_byte(i):
            types[i] = gguf.TokenType.BYTE
        else:
            types[i] = gguf.TokenType.NORMAL
    # Tokens the HF tokenizer added on top of the SentencePiece model (ids >= n_sp).
    config_file = source_dir / "tokenizer_config.json"
    tokenizer_config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    for token_id, token in (tokenizer_config.get("added_tokens_decoder") or {}).items():
        token_id = int(token_id)
        if n_sp <= token_id < vocab_size:
            tokens[token_id] = token["content"].encode("utf-8")
            scores[token_id] = -1000.0
            types[token_id] = gguf.TokenType.CONTROL if token.get("special") else gguf.TokenType.USER_DEFINED

    settings = tokenizer_settings(source_dir, "llama")
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre(settings["pre"])
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    special = {"bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id(), "pad": sp.pad_id()}
    special = {k: v for k, v in special.items() if v >= 0}
    setters = {
        "bos": writer.add_bos_token_id,
        "eos": writer.add_eos_token_id,
        "unk": writer.add_unk_token_id,
        "pad": writer.add_pad_token_id,
    }
    for kind, token_id in special.items():
        setters[kind](token_id)
    written = _write_settings(writer, settings)
    return {"type": "llama (SentencePiece)", "pieces": n_sp, "padded_to": vocab_size, "special_ids": special, **written}


def _spm_adds_dummy_prefix(spm_path: Path) -> bool:
    try:
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(spm_path.read_bytes())
        return bool(proto.normalizer_spec.add_dummy_prefix)
    except Exception:  # protobuf missing: SentencePiece's own default
        return True


def _add_bpe_vocab(writer, tokenizer_json: Path, vocab_size: int) -> dict[str, Any]:
    """A byte-level BPE ``tokenizer.json`` as llama.cpp's ``gpt2`` tokenizer model."""
    import gguf

    spec = json.loads(tokenizer_json.read_text())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise NotImplementedError(f"{tokenizer_json}: tokenizer model {model.get('type')!r} cannot be written to GGUF")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for token, token_id in model["vocab"].items():
        if token_id < vocab_size:
            tokens[token_id], types[token_id] = token, gguf.TokenType.NORMAL
    for added in spec.get("added_tokens", []):
        if added["id"] < vocab_size:
            tokens[added["id"]] = added["content"]
            types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    settings = tokenizer_settings(tokenizer_json.parent, "gpt2")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(settings["pre"])
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    special = gguf.SpecialVocab(tokenizer_json.parent, load_merges=False, n_vocab=vocab_size)
    special.add_special_token.clear()  # add-BOS / add-EOS come from the settings (one source of truth)
    special.chat_template = None
    special.add_to_gguf(writer, quiet=True)
    written = _write_settings(writer, settings)
    return {"type": "gpt2 (byte-level BPE)", "pieces": len(model["vocab"]), "padded_to": vocab_size,
            "special_ids": dict(special.special_token_ids), **written}
