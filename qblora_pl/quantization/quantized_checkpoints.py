"""Quantized checkpoints in: a compressed-tensors ``pack-quantized`` folder as the GroupwiseInt base, exactly.

A model published by llm-compressor (``W4A16_ASYM``, GPTQ or round-to-nearest) stores each linear
layer's codes, scales and integer zero points (layout: :mod:`qblora_pl.export.compressed_tensors_writer`).
Given as ``model_name_or_path`` to ``GroupwiseInt``, such a folder becomes the frozen base as it is:
the codes are kept, the scales keep their stored dtype, and each zero point ``z`` becomes the float32
offset ``-scale * z``, so ``scale * q + offset`` is the checkpoint's ``scale * (q - z)``. This is
QA-LoRA's original setting: fine-tune a published quantized model with QA-LoRA / QA-BLoRA and export it
back (``formats: [..., compressed-tensors]``) with the adapters folded into its zero points.

Everything that is not a quantized linear (embeddings, norms, an ignored ``lm_head``) comes from
transformers' own load of the folder (``CompressedTensorsConfig(dequantize=True)``), which needs the
``compressed-tensors`` package; that load's dequantized weights are also what each layer is checked
against (equal to float32 rounding).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["is_compressed_tensors_checkpoint", "load_compressed_tensors_base", "unpack_int32_rows"]


def _quantization_config(path: str | Path) -> dict[str, Any] | None:
    config = Path(path) / "config.json"
    if not config.is_file():
        return None
    try:
        return json.loads(config.read_text()).get("quantization_config")
    except (OSError, ValueError):
        return None


def is_compressed_tensors_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a local folder whose config declares compressed-tensors quantization."""
    config = _quantization_config(path)
    return isinstance(config, dict) and config.get("quant_method") == "compressed-tensors"


def unpack_int32_rows(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Invert compressed-tensors' ``pack_to_int32`` along rows: int32 ``(R, W)`` -> the first ``count``
    unsigned ``bits``-bit values of each row's little-endian bit stream, ``uint8 (R, count)``."""
    array = np.ascontiguousarray(words.to(torch.int32).cpu().numpy()).view("<u4").view(np.uint8)
    rows = array.shape[0]
    stream = np.unpackbits(array.reshape(rows, -1), axis=-1, bitorder="little")[:, : count * bits]
    planes = stream.reshape(rows, count, bits).astype(np.uint8)
    return torch.from_numpy((planes << np.arange(bits, dtype=np.uint8)).sum(-1, dtype=np.uint8))


def _scheme_for(name: str, groups: dict[str, Any]) -> dict[str, Any] | None:
    """The ``weights`` args of the config group whose targets match layer ``name`` (a name, ``re:`` pattern
    or ``Linear``), name matches first, as compressed-tensors resolves them."""
    fallback = None
    for group in groups.values():
        for target in group.get("targets", []):
            if target == name or (target.startswith("re:") and re.match(target[3:], name)):
                return group.get("weights")
            if target == "Linear" and fallback is None:
                fallback = group.get("weights")
    return fallback


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: a compressed-tensors checkpoint without *.safetensors files")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors.update(load_file(str(file)))
    return tensors


def load_compressed_tensors_base(path: str | Path, bits: int, group_size: int) -> nn.Module:
    """The folder's model with each quantized linear a :class:`GroupwiseIntLinear` holding its codes, scales
    and zero points (as offsets); ``bits`` / ``group_size`` must be the checkpoint's (the backend's settings:
    a mismatch is refused naming both)."""
    from qblora_pl.quantization.groupwise_int import GroupwiseIntLinear

    path = Path(path)
    config = _quantization_config(path) or {}
    fmt = config.get("format")
    groups = config.get("config_groups") or {}
    tensors = _read_tensors(path)
    names = sorted(key[: -len(".weight_packed")] for key in tensors if key.endswith(".weight_packed"))
    if not names:
        raise ValueError(f"{path}: compressed-tensors format {fmt!r} has no *.weight_packed tensors; only "
                         "pack-quantized integer checkpoints load as a GroupwiseInt base")
    model = _dense_model(path)
    checked = 0.0
    for name in names:
        scheme = _scheme_for(name, groups) or {}
        found = (scheme.get("num_bits"), scheme.get("group_size"))
        if scheme.get("type", "int") != "int" or scheme.get("strategy") != "group" or found != (bits, group_size):
            raise ValueError(
                f"{path}: layer {name} is quantized as type={scheme.get('type')!r}, strategy={scheme.get('strategy')!r}, "
                f"num_bits={found[0]}, group_size={found[1]}; GroupwiseInt(bits={bits}, group_size={group_size}) loads "
                "integer group quantization of its own bits and group size: set model.quantization's bits / group_size "
                "to the checkpoint's"
            )
        d_out, d_in = (int(v) for v in tensors[f"{name}.weight_shape"].tolist())
        codes = unpack_int32_rows(tensors[f"{name}.weight_packed"], bits, d_in)
        scales = tensors[f"{name}.weight_scale"]
        if f"{name}.weight_zero_point" in tensors:
            zero = unpack_int32_rows(tensors[f"{name}.weight_zero_point"].T.contiguous(), bits, d_out).T
        else:  # symmetric: W = scale * (q - 2^(b-1))
            zero = torch.full(scales.shape, 1 << (bits - 1), dtype=torch.uint8)
        dense = model.get_submodule(name)
        layer = GroupwiseIntLinear.from_quantized(dense, (codes, scales, torch.zeros_like(scales)), bits, group_size,
                                                  scale_dtype=scales.dtype)
        layer.offsets = -scales.float() * zero.float()  # float32: exact for any scale dtype
        with torch.no_grad():
            reference = dense.weight.float()
            checked = max(checked, float((layer.dequantize() - reference).abs().max()))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
    model.quantization_source = {"format": "compressed-tensors", "path": str(path), "layers": len(names),
                                 "max_abs_diff_vs_transformers": checked}
    return model


def _dense_model(path: Path) -> nn.Module:
    """transformers' own load of the folder, decompressed to float32 (the non-quantized tensors come from it)."""
    import importlib.util
    import warnings

    if importlib.util.find_spec("compressed_tensors") is None:
        raise ImportError(f"{path} is a compressed-tensors checkpoint; reading it needs compressed-tensors: "
                          "pip install -e '.[vllm]'")
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="You passed `quantization_config`", category=UserWarning)
        model = AutoModelForCausalLM.from_pretrained(str(path), quantization_config=CompressedTensorsConfig(dequantize=True),
                                                     dtype=torch.float32)
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    return model
