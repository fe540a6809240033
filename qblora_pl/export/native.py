"""The project's own low-bit checkpoint: write a merged model, load it back as a plain HF model.

Layout of an export directory::

    model.safetensors     every INT-b layer as ``<layer>.packed_codes`` (uint8, the bit-packed
                          codes of qblora_pl.quantization.packing), ``<layer>.scales``,
                          ``<layer>.offsets`` (float32 after a QA-* merge: the folded update is
                          kept exactly), ``<layer>.bias`` if any; dense layers as
                          ``<layer>.weight`` / ``.bias``; every other tensor (embeddings, norms)
                          under its state-dict name, in its own dtype.
    qblora_config.json    format tag, bits / group size, the training method, the HF config and
                          a per-layer map (storage, bits, group size, dtypes, how it merged,
                          re-quantization error where there was one).
    tokenizer files       copied from the source model.

The safetensors keys are exactly the state dict of a Hugging Face model whose quantized layers
are :class:`GroupwiseIntLinear` modules, so the reader,
:func:`qblora_pl.quantization.native_checkpoint.load_native`, is "build the skeleton, swap in
``GroupwiseIntLinear``, ``load_state_dict(strict=True)``".

QA-LoRA / QA-BLoRA on an INT-b base merge exactly (codes untouched). LoRA / Q-BLoRA merges are
dense; this format re-quantizes them to INT-b by round-to-nearest (lossy, docs/method.md section 5)
and says so with an :class:`ExportFallbackWarning` carrying the measured weight error.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from qblora_pl.atomic import atomic_directory
from qblora_pl.dtypes import dtype_name
from qblora_pl.export.snapshot import (
    FROZEN_DENSE,
    ExportFallbackWarning,
    ModelSnapshot,
    check_finite_tensors,
    requantize_linear,
)
from qblora_pl.export.tokenizer_files import copy_tokenizer_files
from qblora_pl.quantization.packing import pack_codes

# The reader (load_native, is_native_export) lives with the other quantized checkpoints a run can load.
from qblora_pl.quantization.native_checkpoint import CONFIG_FILE, NATIVE_FORMAT, NATIVE_FORMAT_VERSION, WEIGHTS_FILE


def write_native(
    snapshot: ModelSnapshot,
    path: str | Path,
    tokenizer_source: str | Path,
    *,
    bits: int = 4,
    group_size: int = 32,
    method: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``snapshot`` as a native low-bit checkpoint directory at ``path`` (atomically).

    ``bits`` / ``group_size`` are used only for layers that are not already INT-b and must be
    re-quantized (dense merges of LoRA / Q-BLoRA, NF4 bases); INT-b layers keep their own.
    Frozen dense layers (the ``lm_head``) stay dense. Returns a summary for the export report.
    """
    tensors: dict[str, torch.Tensor] = {}
    layer_map: dict[str, dict[str, Any]] = {}
    requantized: dict[str, float] = {}
    for name, linear in snapshot.linears.items():
        entry: dict[str, Any] = {"d_out": linear.d_out, "d_in": linear.d_in, "origin": linear.origin}
        if linear.is_quantized:
            parts = linear.quantized
            entry["merge"] = snapshot.merge_how.get(name)
        elif linear.origin == FROZEN_DENSE:
            parts = None
        else:
            parts, rel_error = requantize_linear(linear, bits, group_size)
            requantized[name] = rel_error
            entry["requantized"] = {"method": "min-max round-to-nearest", "relative_weight_error": rel_error}
        if parts is None:
            entry.update(storage="dense", dtype=dtype_name(linear.weight.dtype))
            tensors[f"{name}.weight"] = linear.weight.contiguous()
        else:
            entry.update(
                storage="int",
                bits=parts.bits,
                group_size=parts.group_size,
                scale_dtype=dtype_name(parts.scales.dtype),
                offset_dtype=dtype_name(parts.offsets.dtype),
            )
            tensors[f"{name}.packed_codes"] = pack_codes(parts.codes, parts.bits).contiguous()
            tensors[f"{name}.scales"] = parts.scales.contiguous()
            tensors[f"{name}.offsets"] = parts.offsets.contiguous()
        entry["bias"] = linear.bias is not None
        if linear.bias is not None:
            # GroupwiseIntLinear keeps its bias in float32; a dense layer in its own dtype.
            tensors[f"{name}.bias"] = (linear.bias.float() if parts is not None else linear.bias).contiguous()
        layer_map[name] = entry

    tied = snapshot.tied_embeddings
    for key, tensor in snapshot.others.items():
        tensors[key] = tensor.contiguous()
    if tied:
        tensors.pop("lm_head.weight", None)
    check_finite_tensors(tensors)

    if requantized:
        worst = max(requantized, key=requantized.get)
        warnings.warn(
            f"native export: {len(requantized)} layer(s) are not on an INT-b grid after merging "
            f"({', '.join(sorted({snapshot.linears[n].origin for n in requantized}))}) and were "
            f"re-quantized to INT{bits} g{group_size} by round-to-nearest - a lossy fallback. "
            f"Relative weight error ||Q(W)-W||/||W||: max {requantized[worst]:.4g} ({worst}), "
            f"mean {sum(requantized.values()) / len(requantized):.4g}. QA-LoRA / QA-BLoRA on an "
            f"INT-b base export exactly.",
            ExportFallbackWarning,
            stacklevel=2,
        )

    int_layers = [e for e in layer_map.values() if e["storage"] == "int"]
    config = {
        "format": NATIVE_FORMAT,
        "format_version": NATIVE_FORMAT_VERSION,
        "bits": _most_common([e["bits"] for e in int_layers]),
        "group_size": _most_common([e["group_size"] for e in int_layers]),
        "method": method or {},
        "tie_word_embeddings": tied,
        "dtype": _dense_dtype_of(snapshot),
        "hf_config": snapshot.config.to_dict(),
        "layers": layer_map,
    }
    path = Path(path)
    with atomic_directory(path) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "qblora_format": NATIVE_FORMAT})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, default=str))
        tokenizer = copy_tokenizer_files(tokenizer_source, tmp)
    return {
        "path": str(path),
        "bytes": (path / WEIGHTS_FILE).stat().st_size,
        "int_layers": len(int_layers),
        "dense_layers": len(layer_map) - len(int_layers),
        "requantized_layers": requantized,
        "tokenizer_files": tokenizer,
    }


def _most_common(values: list[int]) -> int | None:
    return max(set(values), key=values.count) if values else None


def _dense_dtype_of(snapshot: ModelSnapshot) -> str:
    """The dtype the non-quantized tensors are stored in (that of the input embeddings)."""
    for key, tensor in snapshot.others.items():
        if key.endswith("embed_tokens.weight"):
            return dtype_name(tensor.dtype)
    floats = [t.dtype for t in snapshot.others.values() if t.is_floating_point()]
    return dtype_name(floats[0]) if floats else "float32"
