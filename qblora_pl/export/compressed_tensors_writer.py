"""compressed-tensors ``pack-quantized`` export: the low-bit model vLLM and SGLang serve on GPUs.

compressed-tensors (what llm-compressor writes, e.g. ``W4A16_ASYM``) stores a group-quantized
linear layer ``P`` of shape ``[O, I]`` as

    P.weight_packed       int32 [O, ceil(I * b / 32)]  the codes, one little-endian bit stream per row
                                                        (code j at bit j * b), as unsigned values
    P.weight_scale        [O, I / g]                   in the model's dtype
    P.weight_zero_point   int32 [ceil(O * b / 32), I / g]  integer zero points, packed the same way
                                                        along the output dimension (asymmetric only)
    P.weight_shape        int64 [2]                    [O, I]

and reconstructs ``W = scale * (x_q - z)`` with the library's signed ``x_q = q - 2^(b-1)`` and
``z = z_u - 2^(b-1)``, i.e. ``W = scale * (q - z_u)``. Our INT-b form is
``W = scale * q + offset`` (docs/method.md section 3), so a layer is exact in this format exactly when
its offsets are integer multiples of its scales, ``offset = -scale * z_u`` with ``z_u`` in
``0 .. 2^b - 1``. A min-max base and a QA-* merge's offsets generally are not:

* training with ``QATSchedule(zero_point: integer)`` makes the trained model the one with rounded
  zero points (the exporter then rounds them: the export is the model as trained);
* ``round_zero_points=True`` rounds them for any model; the rounding's largest weight change is
  reported and the export's verification measures what it cost in logits;
* otherwise the writer refuses, naming the layer with the largest rounding error.

Where every zero point is ``2^(b-1)`` the layer group is written symmetric (no zero-point tensor),
the most widely served path. ``config.json`` gets the ``quantization_config`` llm-compressor writes
(``quant_method: compressed-tensors``, ``format: pack-quantized``, one config group per bit width and
group size, ``ignore`` listing the layers kept dense: ``lm_head`` and, by default, layers that are not
INT-b after merging). Loaded back for verification by transformers with compressed-tensors
(:func:`load_compressed_tensors`).
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file

from qblora_pl.atomic import atomic_directory
from qblora_pl.dtypes import dtype_name
from qblora_pl.export.snapshot import (
    FROZEN_DENSE,
    ExportFallbackWarning,
    ModelSnapshot,
    QuantizedParts,
    check_finite_tensors,
)
from qblora_pl.export.tokenizer_files import copy_tokenizer_files
from qblora_pl.quantization.int_quantizer import GroupwiseIntQuantizer
from qblora_pl.quantization.packing import pack_bitstream

CT_WEIGHTS_FILE = "model.safetensors"
CT_CONFIG_FILE = "config.json"
#: Widths and group sizes this writer produces (vLLM's kernels serve 4 and 8 bits; 2 and 3 load in
#: transformers and depend on newer vLLM kernels).
CT_BITS = (2, 3, 4, 8)
CT_GROUP_SIZES = (32, 64, 128)
CT_CLIENT = "transformers + compressed-tensors (CompressedTensorsConfig(dequantize=True), CPU)"

CTFallback = Literal["dense", "requantize"]


class ZeroPointRoundingError(ValueError):
    """The merged offsets are not integer multiples of the scales, and rounding them was not allowed."""


def pack_int32_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """compressed-tensors' ``pack_to_int32`` along the last dimension, for unsigned ``values``
    (:func:`~qblora_pl.quantization.packing.pack_bitstream`, at the widths this writer produces)."""
    if bits not in CT_BITS:
        raise ValueError(f"bits={bits} is not one of {CT_BITS}")
    return pack_bitstream(values, bits)


def integer_zero_points(parts: QuantizedParts) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``z_u = round(-offset / scale)`` clamped to ``0 .. 2^b - 1``, the offsets it stands for
    (``-scale * z_u``, float32) and the largest ``|offset - (-scale * z_u)|``."""
    zero, rounded = GroupwiseIntQuantizer(parts.bits, parts.group_size).integer_zero_points(parts.scales, parts.offsets)
    error = float((rounded - parts.offsets.float()).abs().max()) if rounded.numel() else 0.0
    return zero.to(torch.int64), rounded, error


def requantize_integer_zero_point(weight: torch.Tensor, bits: int, group_size: int) -> QuantizedParts:
    """Min-max round-to-nearest with an integer zero point (what compressed-tensors' minmax observer does)."""
    d_out, d_in = weight.shape
    groups = weight.float().reshape(d_out, d_in // group_size, group_size)
    low = groups.amin(-1).clamp(max=0)
    high = groups.amax(-1).clamp(min=0)
    max_code = (1 << bits) - 1
    scales = ((high - low) / max_code).clamp_min(torch.finfo(torch.float32).tiny)
    zero = torch.round(-low / scales).clamp(0, max_code)
    codes = (torch.round(groups / scales.unsqueeze(-1)) + zero.unsqueeze(-1)).clamp(0, max_code)
    return QuantizedParts(codes.reshape(d_out, d_in).to(torch.uint8), scales, -scales * zero, bits, group_size)


def write_compressed_tensors(
    snapshot: ModelSnapshot,
    path: str | Path,
    tokenizer_source: str | Path,
    *,
    round_zero_points: bool = False,
    fallback: CTFallback = "dense",
    bits: int = 4,
    group_size: int = 32,
    rounding_reason: str | None = None,
) -> dict[str, Any]:
    """Write ``snapshot`` as a compressed-tensors ``pack-quantized`` model directory at ``path`` (atomically).

    INT-b layers keep their codes; their offsets become integer zero points, which must be exact
    unless ``round_zero_points`` (else :class:`ZeroPointRoundingError`). ``fallback`` decides the
    layers that are not INT-b after merging (dense LoRA / Q-BLoRA merges, NF4 bases): ``"dense"``
    keeps them unquantized (listed in ``ignore``; exact), ``"requantize"`` quantizes them to
    INT``bits`` g``group_size`` by min-max round-to-nearest with integer zero points (lossy, warned
    with the measured error). ``rounding_reason`` is recorded when the caller allowed the rounding
    (e.g. the model was trained with integer zero points). Returns a summary for the export report.
    """
    if fallback not in ("dense", "requantize"):
        raise ValueError(f"fallback={fallback!r} is not 'dense' or 'requantize'")
    serving_dtype = _model_dtype(snapshot)
    tied = snapshot.tied_embeddings

    quantized: dict[str, tuple[QuantizedParts, torch.Tensor]] = {}
    dense: list[str] = []
    rounding: dict[str, float] = {}
    requantized: dict[str, float] = {}
    for name, linear in snapshot.linears.items():
        if tied and name == "lm_head":
            continue
        parts = linear.quantized
        if parts is None and fallback == "requantize" and linear.origin != FROZEN_DENSE:
            weight = linear.dense_weight()
            parts = requantize_integer_zero_point(weight, bits, group_size)
            requantized[name] = float((parts.dequantize() - weight).norm() / weight.norm().clamp_min(1e-12))
        if parts is None:
            dense.append(name)
            continue
        _check_layout(name, parts)
        zero, _, error = integer_zero_points(parts)
        rounding[name] = error
        quantized[name] = (parts, zero)

    inexact = {n: e for n, e in rounding.items() if e > 0}
    if inexact and not round_zero_points:
        worst = max(inexact, key=inexact.get)
        raise ZeroPointRoundingError(
            f"compressed-tensors export: {len(inexact)} of {len(rounding)} INT-b layers have offsets that are not "
            f"integer multiples of their scales (W = scale * (q - z) needs an integer zero point z); the largest "
            f"rounding would change an offset by {inexact[worst]:.3g} ({worst}). Either train with integer zero "
            "points (QATSchedule zero_point: integer), or pass round_zero_points: true (MergeExport init_args / "
            "main.py export --round_zero_points) to round them; the export's verification then reports what the "
            "rounding cost"
        )
    if requantized:
        worst = max(requantized, key=requantized.get)
        warnings.warn(
            f"compressed-tensors export: {len(requantized)} layer(s) are not on an INT-b grid after merging and were "
            f"re-quantized to INT{bits} g{group_size} by round-to-nearest with integer zero points - a lossy fallback "
            f"(fallback='dense' keeps them unquantized). Relative weight error: max {requantized[worst]:.4g} ({worst}).",
            ExportFallbackWarning,
            stacklevel=2,
        )

    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict[str, Any]] = {}
    schemes: dict[tuple[int, int], list[str]] = {}
    max_weight_change = 0.0
    for name, (parts, zero) in quantized.items():
        symmetric_point = 1 << (parts.bits - 1)
        scales = parts.scales.to(serving_dtype)
        tensors[f"{name}.weight_packed"] = pack_int32_rows(parts.codes, parts.bits)
        tensors[f"{name}.weight_scale"] = scales.contiguous()
        tensors[f"{name}.weight_shape"] = torch.tensor(list(parts.codes.shape), dtype=torch.int64)
        tensors[f"{name}.weight_zero_point"] = pack_int32_rows(zero.T.contiguous(), parts.bits).T.contiguous()
        bias = snapshot.linears[name].bias
        if bias is not None:
            tensors[f"{name}.bias"] = bias.to(serving_dtype).contiguous()
        stored = QuantizedParts(parts.codes, scales, -scales.float() * zero, parts.bits, parts.group_size)
        change = float((stored.dequantize() - parts.dequantize()).abs().max())
        max_weight_change = max(max_weight_change, change)
        schemes.setdefault((parts.bits, parts.group_size), []).append(name)
        layers[name] = {"bits": parts.bits, "group_size": parts.group_size, "origin": snapshot.linears[name].origin,
                        "max_abs_offset_rounding": rounding[name], "max_abs_weight_change": change,
                        "symmetric": bool((zero == symmetric_point).all())}
        if name in requantized:
            layers[name]["requantized"] = {"method": "min-max round-to-nearest, integer zero point",
                                           "relative_weight_error": requantized[name]}
    for name in dense:
        linear = snapshot.linears[name]
        tensors[f"{name}.weight"] = linear.weight.contiguous()
        if linear.bias is not None:
            tensors[f"{name}.bias"] = linear.bias.contiguous()
        layers[name] = {"storage": "dense", "origin": linear.origin, "dtype": dtype_name(linear.weight.dtype)}
    symmetric_groups = set()
    for key, names in schemes.items():
        if all(layers[n]["symmetric"] for n in names):
            symmetric_groups.add(key)
            for n in names:
                del tensors[f"{n}.weight_zero_point"]
    for key, tensor in snapshot.others.items():
        tensors[key] = tensor.contiguous()
    if tied:
        tensors.pop("lm_head.weight", None)
    check_finite_tensors(tensors, "compressed-tensors export")

    ignore = sorted({"lm_head", *dense})  # the output head is never quantized here (tied or not)
    quantization_config = compressed_tensors_config(schemes, symmetric_groups, ignore)
    config = copy.deepcopy(snapshot.config.to_dict())
    config.pop("_name_or_path", None)
    config["quantization_config"] = quantization_config
    path = Path(path)
    with atomic_directory(path) as tmp:
        save_file(tensors, str(tmp / CT_WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CT_CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
        tokenizer = copy_tokenizer_files(tokenizer_source, tmp)

    n_weights = sum(p.codes.numel() for p, _ in quantized.values())
    n_bytes = sum(tensors[f"{n}.{part}"].nbytes for n in quantized
                  for part in ("weight_packed", "weight_scale", "weight_zero_point") if f"{n}.{part}" in tensors)
    return {
        "path": str(path),
        "bytes": (path / CT_WEIGHTS_FILE).stat().st_size,
        "quantization_config": quantization_config,
        "scale_dtype": dtype_name(serving_dtype),
        "int_layers": len(quantized),
        "dense_layers": len(dense),
        "bits_per_quantized_weight": 8 * n_bytes / n_weights if n_weights else None,
        "zero_points_rounded": bool(inexact),
        "rounding_reason": (rounding_reason or "round_zero_points: true") if inexact else None,
        "max_abs_offset_rounding": max(rounding.values(), default=0.0),
        "max_abs_weight_change": max_weight_change,
        "requantized_layers": requantized,
        "layers": layers,
        "tokenizer_files": tokenizer,
    }


def compressed_tensors_config(schemes: dict[tuple[int, int], list[str]], symmetric: set[tuple[int, int]],
                              ignore: list[str]) -> dict[str, Any]:
    """config.json's ``quantization_config``: one config group per (bits, group size), as llm-compressor writes it.

    One group targets every ``Linear`` not in ``ignore``; with several, each lists its layers by name.
    """
    groups = {}
    for index, ((bits, group_size), names) in enumerate(sorted(schemes.items())):
        groups[f"group_{index}"] = {
            "targets": ["Linear"] if len(schemes) == 1 else sorted(names),
            "weights": {"num_bits": bits, "type": "int", "symmetric": (bits, group_size) in symmetric,
                        "strategy": "group", "group_size": group_size, "dynamic": False, "actorder": None,
                        "block_structure": None, "observer": "minmax", "observer_kwargs": {}},
            "input_activations": None,
            "output_activations": None,
            "format": "pack-quantized",
        }
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": ignore,
        "kv_cache_scheme": None,
        "sparsity_config": {},
        "global_compression_ratio": None,
    }


def load_compressed_tensors(path: str | Path):
    """Load a compressed-tensors export with transformers (dequantized to float32 on load) for verification."""
    from qblora_pl.quantization.quantized_checkpoints import load_compressed_tensors_dense

    return load_compressed_tensors_dense(path, "compressed-tensors export").eval()


def _model_dtype(snapshot: ModelSnapshot) -> torch.dtype:
    dtype = getattr(snapshot.config, "dtype", None) or getattr(snapshot.config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def _check_layout(name: str, parts: QuantizedParts) -> None:
    if parts.bits not in CT_BITS:
        raise ValueError(f"layer {name}: {parts.bits}-bit codes: the compressed-tensors writer takes {CT_BITS}")
    if parts.group_size not in CT_GROUP_SIZES:
        raise ValueError(f"layer {name}: group_size={parts.group_size} is not one of {CT_GROUP_SIZES}")
