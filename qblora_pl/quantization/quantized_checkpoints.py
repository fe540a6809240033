"""Quantized checkpoints in: a compressed-tensors ``pack-quantized`` or a GPTQ folder as the GroupwiseInt base, exactly.

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

A GPTQ folder (AutoGPTQ / GPTQModel: ``quant_method: gptq``, ``desc_act: false``, ``sym`` true or
false, ``checkpoint_format`` ``gptq`` or ``gptq_v2``) loads the same way without any GPTQ package:

    P.qweight   int32 [I * b / 32, O]   codes of each output column as one little-endian bit stream
                                         down the input dimension (3 bits straddle words the same way)
    P.qzeros    int32 [I / g, O * b / 32] zero points, packed along the output dimension
    P.scales    [I / g, O]
    P.g_idx     int32 [I]               the group of each input (``i // g`` without act-order)

with ``W[o, i] = scales[G, o] * (q[i, o] - z[G, o])``. ``checkpoint_format: gptq`` (v1) stores
``z - 1``; the runtimes add the 1 back without wrapping, so a stored all-ones field means ``z = 2^b``,
which is what is loaded (the float offset holds any integer zero point). ``gptq_v2`` stores ``z``.
A checkpoint with act-order (``desc_act: true`` or a ``g_idx`` that is not ``i // g``) is refused.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

# compressed-tensors' ``unpack_from_int32`` along rows, for unsigned values (also GPTQ's qweight / qzeros)
from qblora_pl.quantization.packing import unpack_bitstream as unpack_int32_rows

__all__ = [
    "is_compressed_tensors_checkpoint",
    "load_compressed_tensors_dense",
    "is_gptq_checkpoint",
    "load_compressed_tensors_base",
    "load_gptq_base",
    "unpack_int32_rows",
]


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


def is_gptq_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a local folder whose config declares GPTQ quantization."""
    config = _quantization_config(path)
    return isinstance(config, dict) and config.get("quant_method") == "gptq"


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
    from qblora_pl.quantization.int_layer import GroupwiseIntLinear

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


def load_compressed_tensors_dense(path: str | Path, what: str = "compressed-tensors checkpoint") -> nn.Module:
    """transformers' own load of a compressed-tensors folder, decompressed to float32 on load
    (``CompressedTensorsConfig(dequantize=True)``: its default compressed load of an asymmetric group model
    fails on CPU). Needs the compressed-tensors package; ``what`` names the folder in that error."""
    import importlib.util
    import warnings

    if importlib.util.find_spec("compressed_tensors") is None:
        raise ImportError(f"reading the {what} {path} needs compressed-tensors: pip install -e '.[vllm]'")
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    with warnings.catch_warnings():  # "the model's quantization_config will be used": the point of passing ours
        warnings.filterwarnings("ignore", message="You passed `quantization_config`", category=UserWarning)
        return AutoModelForCausalLM.from_pretrained(
            str(path), quantization_config=CompressedTensorsConfig(dequantize=True), dtype=torch.float32
        )


def _dense_model(path: Path) -> nn.Module:
    """The folder as a plain float32 model (its non-quantized tensors and the layers' reference weights)."""
    model = load_compressed_tensors_dense(path)
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    return model


def load_gptq_base(path: str | Path, bits: int, group_size: int) -> nn.Module:
    """The GPTQ folder's model with each quantized linear a :class:`GroupwiseIntLinear` (codes, scales, zero
    points as offsets); ``bits`` / ``group_size`` must be the checkpoint's, and act-order is refused."""
    from qblora_pl.quantization.int_layer import GroupwiseIntLinear

    path = Path(path)
    config = _quantization_config(path) or {}
    found = (config.get("bits"), config.get("group_size"))
    if found != (bits, group_size):
        raise ValueError(f"{path}: a GPTQ checkpoint of bits={found[0]}, group_size={found[1]}; set model.quantization's "
                         f"bits / group_size to the checkpoint's (GroupwiseInt(bits={bits}, group_size={group_size}) "
                         "loads its own bits and group size)")
    if config.get("desc_act"):
        raise ValueError(f"{path}: GPTQ with act-order (desc_act: true) permutes each layer's groups; the GroupwiseInt "
                         "base keeps contiguous groups, so it cannot load this checkpoint exactly")
    checkpoint_format = config.get("checkpoint_format", "gptq")
    if checkpoint_format not in ("gptq", "gptq_v2"):
        raise ValueError(f"{path}: GPTQ checkpoint_format={checkpoint_format!r}: only 'gptq' (v1) and 'gptq_v2' load")
    tensors = _read_tensors(path)
    names = sorted(key[: -len(".qweight")] for key in tensors if key.endswith(".qweight"))
    if not names:
        raise ValueError(f"{path}: a GPTQ config but no *.qweight tensors")
    model = _skeleton_model(path, tensors, names, suffixes=("qweight", "qzeros", "scales", "g_idx", "bias"))
    mask = (1 << bits) - 1
    for name in names:
        scales = tensors[f"{name}.scales"].T.contiguous()  # (O, G)
        d_out, n_groups = scales.shape
        d_in = n_groups * group_size
        codes = unpack_int32_rows(tensors[f"{name}.qweight"].T.contiguous(), bits, d_in)
        zero = unpack_int32_rows(tensors[f"{name}.qzeros"], bits, d_out).T.to(torch.int64)  # (O, G)
        if checkpoint_format == "gptq":
            zero = zero + 1  # v1 stores z - 1; its runtimes add 1 back without wrapping (a stored all-ones is 2^b)
        g_idx = tensors.get(f"{name}.g_idx")
        if g_idx is not None and not torch.equal(g_idx.to(torch.int64), torch.arange(d_in) // group_size):
            raise ValueError(f"{path}: layer {name} has a g_idx that is not i // group_size (act-order); the "
                             "GroupwiseInt base keeps contiguous groups, so it cannot load this checkpoint exactly")
        bias = tensors.get(f"{name}.bias")
        dense = nn.Linear(d_in, d_out, bias=bias is not None)
        if bias is not None:
            dense.bias.data = bias.float()
        layer = GroupwiseIntLinear.from_quantized(dense, (codes & mask, scales, torch.zeros_like(scales)), bits,
                                                  group_size, scale_dtype=scales.dtype)
        layer.offsets = -scales.float() * zero.float()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
    model.quantization_source = {"format": f"gptq ({checkpoint_format})", "path": str(path), "layers": len(names)}
    return model


def _skeleton_model(path: Path, tensors: dict[str, torch.Tensor], quantized: list[str], suffixes: tuple[str, ...]) -> nn.Module:
    """The folder's architecture in float32 with every tensor but the quantized layers' loaded from ``tensors``
    (weights are not initialised first: each is loaded or the missing ones are named)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    config = AutoConfig.from_pretrained(str(path))
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    prefixes = tuple(name + "." for name in quantized)
    state = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items() if not k.startswith(prefixes)}
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(prefixes)
               and not (k == "lm_head.weight" and getattr(config, "tie_word_embeddings", False))]
    if missing:
        raise ValueError(f"{path}: tensors missing from the checkpoint: {missing[:5]}")
    model.tie_weights()
    return model
