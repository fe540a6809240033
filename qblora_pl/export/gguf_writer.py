"""Write a merged Llama model as a GGUF file that llama.cpp runs.

:func:`write_gguf` writes the model's hyper-parameters, its tokenizer
(:mod:`qblora_pl.export.gguf_vocab`) and its tensors (:mod:`qblora_pl.export.gguf_tensors`:
INT2 / INT3 / INT4 layers with a group size of 32k as exact Q4_1, everything else dense or
through the ``fallback``), and reports each layer's GGUF type and measured weight error.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np

from qblora_pl.atomic import atomic_file
from qblora_pl.export.gguf_tensors import (
    EMBEDDING_TENSORS,
    QK4_1,
    _dense_array,
    _dense_report,
    _linear_to_gguf,
    _source_gguf_tensors,
    llama_permute_rows,
)
from qblora_pl.export.gguf_vocab import _add_vocab
from qblora_pl.export.snapshot import ExportFallbackWarning, ModelSnapshot

GGUFFallback = Literal["f16", "requantize_q4_1"]
DenseType = Literal["auto", "f32", "f16", "q8_0"]


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
