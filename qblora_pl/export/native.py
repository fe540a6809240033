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
are :class:`GroupwiseIntLinear` modules, so :func:`load_native` is "build the skeleton, swap in
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
from safetensors.torch import load_file, save_file
from torch import nn

from qblora_pl.export.atomic import atomic_directory
from qblora_pl.export.snapshot import (
    FROZEN_DENSE,
    ExportFallbackWarning,
    ModelSnapshot,
    check_finite_tensors,
    dtype_from_name,
    dtype_name,
    requantize_linear,
)
from qblora_pl.export.tokenizer_files import copy_tokenizer_files
from qblora_pl.quantization.int_layer import GroupwiseIntLinear, enable_int4_inference
from qblora_pl.quantization.packing import pack_codes

NATIVE_FORMAT = "qblora-native"
NATIVE_FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "qblora_config.json"


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


def is_native_export(path: str | Path) -> bool:
    """Whether ``path`` is a directory written by :func:`write_native` (it holds ``qblora_config.json``)."""
    try:
        return (Path(path).expanduser() / CONFIG_FILE).is_file()
    except (TypeError, OSError):
        return False


def load_native(path: str | Path, device: str | torch.device = "cpu", *, fast_int4: bool = False) -> nn.Module:
    """Load a native export as a Hugging Face causal LM whose INT-b layers are GroupwiseIntLinear.

    The skeleton is built from the stored HF config, each quantized layer is replaced by an
    empty :class:`GroupwiseIntLinear` with the stored bits, group size and buffer dtypes, and the
    weights load with ``strict=True`` - a missing or unexpected tensor is an error. Returns the
    model in eval mode.

    ``fast_int4=True`` switches the INT4 layers to torch's INT4 kernel for inference
    (:func:`~qblora_pl.quantization.int_layer.enable_int4_inference`): much faster decode,
    but bfloat16 compute, so no longer bit-exact with the trained model (about 4e-3 relative
    per-layer output error). The default keeps the exact float32 dequantize path.
    """
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    path = Path(path)
    meta = json.loads((path / CONFIG_FILE).read_text())
    if meta.get("format") != NATIVE_FORMAT:
        raise ValueError(f"{path / CONFIG_FILE}: format is {meta.get('format')!r}, expected {NATIVE_FORMAT!r}")
    if meta.get("format_version", 0) > NATIVE_FORMAT_VERSION:
        raise ValueError(
            f"{path}: native format version {meta['format_version']} is newer than this loader "
            f"(version {NATIVE_FORMAT_VERSION})"
        )
    hf_config = dict(meta["hf_config"])
    config = CONFIG_MAPPING[hf_config["model_type"]].from_dict(hf_config)
    dtype = dtype_from_name(meta.get("dtype", "float32"))
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)

    for name, entry in meta["layers"].items():
        if entry["storage"] != "int":
            continue
        layer = GroupwiseIntLinear(
            entry["d_in"],
            entry["d_out"],
            bits=entry["bits"],
            group_size=entry["group_size"],
            bias=entry["bias"],
            scale_dtype=dtype_from_name(entry["scale_dtype"]),
        )
        # Merged QA-* offsets are float32: give the buffer that dtype so loading does not round them.
        layer.offsets = torch.zeros_like(layer.offsets, dtype=dtype_from_name(entry["offset_dtype"]))
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)

    state = load_file(str(path / WEIGHTS_FILE))
    if meta.get("tie_word_embeddings"):
        missing, unexpected = model.load_state_dict(state, strict=False)
        if set(missing) - {"lm_head.weight"} or unexpected:
            raise RuntimeError(f"{path}: tensors do not match the model: missing {missing}, unexpected {unexpected}")
        model.tie_weights()
    else:
        model.load_state_dict(state, strict=True)
    for name, entry in meta["layers"].items():
        if entry["storage"] == "int":
            offsets = model.get_submodule(name).offsets
            if dtype_name(offsets.dtype) != entry["offset_dtype"]:
                raise RuntimeError(f"layer {name}: offsets loaded as {offsets.dtype}, stored {entry['offset_dtype']}")
    model = model.to(device).eval()
    if fast_int4:
        enable_int4_inference(model)
    return model


def _most_common(values: list[int]) -> int | None:
    return max(set(values), key=values.count) if values else None


def _dense_dtype_of(snapshot: ModelSnapshot) -> str:
    """The dtype the non-quantized tensors are stored in (that of the input embeddings)."""
    for key, tensor in snapshot.others.items():
        if key.endswith("embed_tokens.weight"):
            return dtype_name(tensor.dtype)
    floats = [t.dtype for t in snapshot.others.values() if t.is_floating_point()]
    return dtype_name(floats[0]) if floats else "float32"
