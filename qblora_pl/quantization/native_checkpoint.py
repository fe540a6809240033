"""Read the project's native low-bit checkpoint (written by :mod:`qblora_pl.export.native`).

A native export is a model source like any other: ``model_name_or_path`` may name one (to score it,
or to train on it as a frozen base), and :func:`load_native` builds it as a Hugging Face causal
LM whose INT-b layers are :class:`~qblora_pl.quantization.int_layer.GroupwiseIntLinear`. The
layout is described in :mod:`qblora_pl.export.native`, which writes it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from qblora_pl.dtypes import dtype_from_name, dtype_name
from qblora_pl.quantization.int_layer import GroupwiseIntLinear, enable_int4_inference

NATIVE_FORMAT = "qblora-native"
NATIVE_FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "qblora_config.json"


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
