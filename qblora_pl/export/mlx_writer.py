"""MLX export: a model directory ``mlx_lm.load`` reads, with our INT-b layers kept exactly.

MLX's affine quantization (``mx.quantize(w, group_size, bits, mode="affine")``) stores, per
group of ``g`` consecutive input features of a row, one ``scale`` and one ``bias`` and
reconstructs ``w = scale * q + bias`` with ``q`` in ``0 .. 2^b - 1`` - exactly our INT-b form
``W_hat = scale[G] * q + offset[G]`` (docs/method.md section 3), so MLX's ``biases`` are our
``offsets`` (same sign) and the codes are copied unchanged. That holds at every width we store
(2, 3, 4, 8 bits; MLX also has 5 and 6) and every group size (32, 64, 128).

Layout (what ``mlx_lm.convert -q`` writes, read by ``mlx_lm.utils.load_model``)::

    model.safetensors   per quantized linear layer ``<layer>.weight`` (uint32, the codes
                        bit-packed, see :func:`pack_mlx_codes`), ``<layer>.scales``,
                        ``<layer>.biases`` (one per group, ``scale_dtype``), ``<layer>.bias``
                        if any; dense linear layers as ``<layer>.weight``; embeddings and norms
                        under their Hugging Face names, in their own dtype.
    config.json         the Hugging Face config plus ``"quantization": {"group_size", "bits",
                        "mode": "affine", <layer>: {...}}`` - the most common width / group as
                        the default and a per-layer entry for every quantized layer that differs -
                        and its copy ``quantization_config`` (mlx-lm's own convention);
                        ``rope_theta`` / ``rope_scaling`` at the top level, where mlx-lm reads them.
    tokenizer files     copied from the source model.

Scales and biases are stored as float32 by default, which keeps the export bit-exact: MLX
accepts float32 scales and biases (``mx.quantize`` of a float32 weight makes them) and merged
QA-* offsets are float32. ``scale_dtype="float16"`` / ``"bfloat16"`` halves their size (mlx-lm's
usual choice) at the cost of rounding them; the rounding is measured and reported.

Layers that are not INT-b after merging (dense LoRA / Q-BLoRA merges, NF4 bases) are stored
dense by default - exact, since mlx-lm keeps a layer without ``scales`` as a plain ``nn.Linear``
- or, with ``fallback="requantize"``, re-quantized to INT-b by round-to-nearest (lossy, warned
with the measured error). Embeddings stay dense (not quantized), so the export is as exact as
its source. The writer needs only torch and numpy; MLX itself is needed only to load the result
(:mod:`qblora_pl.export.mlx_loader`).
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
from qblora_pl.dtypes import dtype_from_name, dtype_name
from qblora_pl.export.snapshot import (
    FROZEN_DENSE,
    ExportFallbackWarning,
    ModelSnapshot,
    QuantizedParts,
    check_finite_tensors,
    requantize_linear,
)
from qblora_pl.export.tokenizer_files import copy_tokenizer_files
from qblora_pl.quantization.packing import pack_bitstream

MLX_WEIGHTS_FILE = "model.safetensors"
MLX_CONFIG_FILE = "config.json"
#: Widths and group sizes MLX's affine mode accepts (``mx.quantize``).
MLX_AFFINE_BITS = (2, 3, 4, 5, 6, 8)
MLX_AFFINE_GROUP_SIZES = (32, 64, 128)
#: Architectures whose Hugging Face state-dict names are mlx-lm's (``mlx_lm/models/llama.py``).
MLX_MODEL_TYPES = ("llama",)
MLX_SCALE_DTYPES = ("float32", "float16", "bfloat16")

MLXFallback = Literal["dense", "requantize"]


def pack_mlx_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``(d_out, d_in)`` codes into MLX's ``uint32`` weight, ``(d_out, d_in * bits / 32)``.

    MLX lays a row's codes out as one little-endian bit stream: code ``j`` occupies bits
    ``j*b .. j*b + b - 1`` (least significant bit first) and every 32 bits form one uint32
    word. For 2, 4 and 8 bits that is "code ``j`` of a word at bit ``b * (j mod 32/b)``"; for 3
    bits (and 5, 6) codes straddle word boundaries. Checked against ``mx.quantize`` for every
    width in ``tests/export/test_export_mlx_runtime.py``.
    """
    if bits not in MLX_AFFINE_BITS:
        raise ValueError(f"bits={bits} has no MLX affine layout; MLX accepts {MLX_AFFINE_BITS}")
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D (d_out, d_in), got shape {tuple(codes.shape)}")
    d_out, d_in = codes.shape
    if (d_in * bits) % 32:
        raise ValueError(f"d_in={d_in} at {bits} bits is {d_in * bits} bits per row, not a whole number of uint32 words")
    if codes.numel() and int(codes.max()) >= 1 << bits:
        raise ValueError(f"codes reach {int(codes.max())}, above the {bits}-bit maximum {(1 << bits) - 1}")
    return pack_bitstream(codes, bits).view(torch.uint32)


def write_mlx(
    snapshot: ModelSnapshot,
    path: str | Path,
    tokenizer_source: str | Path,
    *,
    scale_dtype: str = "float32",
    fallback: MLXFallback = "dense",
    bits: int = 4,
    group_size: int = 32,
) -> dict[str, Any]:
    """Write ``snapshot`` as an mlx-lm model directory at ``path`` (atomically).

    INT-b layers keep their codes; scales and offsets become MLX's ``scales`` / ``biases`` in
    ``scale_dtype`` (float32: exact). ``fallback`` decides the layers that are not INT-b after
    merging (dense merges, NF4 bases): ``"dense"`` stores their weight as it is (exact),
    ``"requantize"`` quantizes them to INT``bits`` g``group_size`` by round-to-nearest (lossy,
    emits :class:`ExportFallbackWarning`). Frozen dense layers (an untied ``lm_head``) stay
    dense either way. Returns a summary for the export report.
    """
    model_type = getattr(snapshot.config, "model_type", None)
    if model_type not in MLX_MODEL_TYPES:
        raise ValueError(f"MLX export supports model types {MLX_MODEL_TYPES}, not {model_type!r}")
    if scale_dtype not in MLX_SCALE_DTYPES:
        raise ValueError(f"scale_dtype={scale_dtype!r} is not one of {MLX_SCALE_DTYPES}")
    if fallback not in ("dense", "requantize"):
        raise ValueError(f"fallback={fallback!r} is not 'dense' or 'requantize'")
    stored_dtype = dtype_from_name(scale_dtype)

    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict[str, Any]] = {}
    requantized: dict[str, float] = {}
    rounding = {"max_abs_scale_rounding": 0.0, "max_abs_bias_rounding": 0.0, "max_abs_weight_error": 0.0}
    tied = snapshot.tied_embeddings
    for name, linear in snapshot.linears.items():
        if tied and name == "lm_head":
            continue  # mlx-lm's llama reads the tied head from the embedding (embed_tokens.as_linear)
        entry: dict[str, Any] = {"d_out": linear.d_out, "d_in": linear.d_in, "origin": linear.origin}
        parts = linear.quantized
        if parts is None and fallback == "requantize" and linear.origin != FROZEN_DENSE:
            parts, requantized[name] = requantize_linear(linear, bits, group_size)
            entry["requantized"] = {"method": "min-max round-to-nearest", "relative_weight_error": requantized[name]}
        if parts is None:
            entry.update(storage="dense", dtype=dtype_name(linear.weight.dtype))
            tensors[f"{name}.weight"] = linear.weight.contiguous()
            if linear.bias is not None:
                tensors[f"{name}.bias"] = linear.bias.contiguous()
        else:
            _check_mlx_layout(name, parts)
            scales, biases = parts.scales.to(stored_dtype), parts.offsets.to(stored_dtype)
            _record_rounding(rounding, parts, scales, biases)
            entry.update(storage="affine", bits=parts.bits, group_size=parts.group_size)
            tensors[f"{name}.weight"] = pack_mlx_codes(parts.codes, parts.bits)
            tensors[f"{name}.scales"] = scales.contiguous()
            tensors[f"{name}.biases"] = biases.contiguous()
            if linear.bias is not None:
                tensors[f"{name}.bias"] = linear.bias.float().contiguous()
        layers[name] = entry
    for key, tensor in snapshot.others.items():
        tensors[key] = tensor.contiguous()
    if tied:
        tensors.pop("lm_head.weight", None)
    check_finite_tensors(tensors, "MLX export")

    if requantized:
        worst = max(requantized, key=requantized.get)
        warnings.warn(
            f"MLX export: {len(requantized)} layer(s) are not on an INT-b grid after merging "
            f"({', '.join(sorted({snapshot.linears[n].origin for n in requantized}))}) and were "
            f"re-quantized to INT{bits} g{group_size} by round-to-nearest - a lossy fallback "
            f"(fallback='dense' keeps them exactly). Relative weight error ||Q(W)-W||/||W||: max "
            f"{requantized[worst]:.4g} ({worst}), mean {sum(requantized.values()) / len(requantized):.4g}.",
            ExportFallbackWarning,
            stacklevel=2,
        )

    quantization = mlx_quantization_block(layers)
    config = mlx_config(snapshot, quantization)
    path = Path(path)
    with atomic_directory(path) as tmp:
        save_file(tensors, str(tmp / MLX_WEIGHTS_FILE), metadata={"format": "mlx"})
        (tmp / MLX_CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
        tokenizer = copy_tokenizer_files(tokenizer_source, tmp)

    quantized = [n for n, e in layers.items() if e["storage"] == "affine"]
    n_weights = sum(layers[n]["d_out"] * layers[n]["d_in"] for n in quantized)
    n_bytes = sum(tensors[f"{n}.{part}"].nbytes for n in quantized for part in ("weight", "scales", "biases"))
    return {
        "path": str(path),
        "bytes": (path / MLX_WEIGHTS_FILE).stat().st_size,
        "quantization": quantization,
        "scale_dtype": scale_dtype,
        "int_layers": len(quantized),
        "dense_layers": len(layers) - len(quantized),
        "bits_per_quantized_weight": 8 * n_bytes / n_weights if n_weights else None,
        **(rounding if quantized else {}),
        "requantized_layers": requantized,
        "layers": layers,
        "tokenizer_files": tokenizer,
    }


def mlx_quantization_block(layers: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """config.json's ``quantization``: the most common (bits, group size) and per-layer overrides.

    mlx-lm quantizes a layer whose path is a key of this block with that entry's parameters;
    other layers that carry ``scales`` get the top-level ones (older mlx-lm) or parameters
    inferred from the tensor shapes (0.32), and layers without ``scales`` stay dense. Every
    quantized layer whose width or group differs from the default is named, so both read it
    the same way. None when no layer is quantized (a plain float model).
    """
    pairs = [(e["bits"], e["group_size"]) for e in layers.values() if e["storage"] == "affine"]
    if not pairs:
        return None
    default = max(sorted(set(pairs)), key=pairs.count)
    block: dict[str, Any] = {"group_size": default[1], "bits": default[0], "mode": "affine"}
    for name, entry in layers.items():
        if entry["storage"] == "affine" and (entry["bits"], entry["group_size"]) != default:
            block[name] = {"group_size": entry["group_size"], "bits": entry["bits"], "mode": "affine"}
    return block


def mlx_config(snapshot: ModelSnapshot, quantization: dict[str, Any] | None) -> dict[str, Any]:
    """The Hugging Face config as mlx-lm reads it.

    transformers 5 keeps the RoPE base inside ``rope_parameters``; mlx-lm's ``ModelArgs``
    reads ``rope_theta`` and ``rope_scaling`` from the top level (silently defaulting to
    10000 otherwise), so both are written there.
    """
    config = copy.deepcopy(snapshot.config.to_dict())
    config.pop("_name_or_path", None)
    rope = config.get("rope_parameters") or {}
    theta = rope.get("rope_theta", config.get("rope_theta"))
    if theta is None:
        raise ValueError("the model config has no rope_theta (neither top-level nor in rope_parameters)")
    config["rope_theta"] = theta
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default" and not config.get("rope_scaling"):
        config["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    if quantization is not None:
        config["quantization"] = quantization
        config["quantization_config"] = copy.deepcopy(quantization)  # mlx_lm.utils.save_config does the same
    return config


def _check_mlx_layout(name: str, parts: QuantizedParts) -> None:
    if parts.bits not in MLX_AFFINE_BITS:
        raise ValueError(f"layer {name}: {parts.bits}-bit codes have no MLX affine layout ({MLX_AFFINE_BITS})")
    if parts.group_size not in MLX_AFFINE_GROUP_SIZES:
        raise ValueError(f"layer {name}: group_size={parts.group_size} is not an MLX group size ({MLX_AFFINE_GROUP_SIZES})")


def _record_rounding(rounding: dict[str, float], parts: QuantizedParts, scales: torch.Tensor, biases: torch.Tensor) -> None:
    """Track what storing scales / biases in ``scale_dtype`` changed (all zero for float32)."""
    scale_err = float((scales.float() - parts.scales.float()).abs().max())
    bias_err = float((biases.float() - parts.offsets.float()).abs().max())
    rounding["max_abs_scale_rounding"] = max(rounding["max_abs_scale_rounding"], scale_err)
    rounding["max_abs_bias_rounding"] = max(rounding["max_abs_bias_rounding"], bias_err)
    if scale_err or bias_err:
        stored = QuantizedParts(parts.codes, scales, biases, parts.bits, parts.group_size)
        weight_err = float((stored.dequantize() - parts.dequantize()).abs().max())
        rounding["max_abs_weight_error"] = max(rounding["max_abs_weight_error"], weight_err)
