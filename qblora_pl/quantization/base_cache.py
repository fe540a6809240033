"""On-disk cache of calibrated INT-b bases, so repeated fits, tests, exports and resumes quantize once.

An entry is a directory under ``<cache_root>/bases/`` (``$QBLORA_PL_CACHE``, see
:func:`qblora_pl.sources.cache_root`) named by a digest of everything that determines the
quantized weights: the source model's files, the bit width, group size, scale dtype, init
(``mse`` / ``gptq``), the target layers and, for GPTQ, the calibration set's token digest and
dampening. It holds ``base.safetensors`` (each quantized layer's ``packed_codes``, ``scales``,
``offsets``, ``bias``) and ``qblora_base.json`` (the key's fields, the layer names, how long
the quantization took). Entries are written with the exports' :func:`atomic_directory` (a
temporary directory renamed into place, staging left by killed writers removed): an
interrupted write leaves nothing a later run could take for a finished one, and two runs
writing the same entry leave one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["BASE_CACHE_FORMAT", "base_cache_dir", "load_cached_base", "save_base", "source_fingerprint"]

#: Bump when the stored layout or the quantization arithmetic changes, so old entries are not reused.
BASE_CACHE_FORMAT = 1
_RECORD = "qblora_base.json"
_TENSORS = "base.safetensors"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


def source_fingerprint(model_name_or_path: str) -> dict[str, Any]:
    """What identifies the source weights: a local file or directory by its weight files'
    names, sizes and modification times (and config.json's content); a hub name by the name."""
    path = Path(model_name_or_path).expanduser()
    if not path.exists():
        return {"hub": model_name_or_path}
    path = path.resolve()
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in _WEIGHT_SUFFIXES)
    fingerprint: dict[str, Any] = {
        "path": str(path),
        "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files],
    }
    config = path / "config.json"
    if path.is_dir() and config.is_file():
        fingerprint["config_sha256"] = hashlib.sha256(config.read_bytes()).hexdigest()[:16]
    return fingerprint


def base_cache_dir(key: dict[str, Any]) -> Path:
    """The entry directory of ``key`` (plain JSON data)."""
    from qblora_pl.sources import cache_root

    text = json.dumps({"format": BASE_CACHE_FORMAT, **key}, sort_keys=True)
    digest = hashlib.sha256(text.encode()).hexdigest()[:20]
    stem = Path(str(key.get("source", {}).get("path") or key.get("source", {}).get("hub", "model"))).name
    return cache_root() / "bases" / f"{stem}-{key.get('init', 'base')}-{digest}"


def load_cached_base(model: nn.Module, directory: Path) -> dict[str, Any] | None:
    """Replace ``model``'s layers named in the entry by the cached quantized layers; None if no entry.

    ``model`` is the float model the entry was made from (same architecture); its matching
    ``nn.Linear`` layers are swapped for :class:`GroupwiseIntLinear` holding the stored tensors.
    """
    from safetensors.torch import load_file

    from qblora_pl.quantization.int_layer import GroupwiseIntLinear

    record_path = directory / _RECORD
    if not record_path.is_file():
        return None
    record = json.loads(record_path.read_text())
    tensors = load_file(str(directory / _TENSORS))
    scale_dtype = getattr(torch, record["key"]["scale_dtype"])
    for name in record["layers"]:
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"cached base {directory}: {name} is a {type(linear).__name__} in this model, not a "
                             "linear layer; delete the entry")
        layer = GroupwiseIntLinear(linear.in_features, linear.out_features, bits=record["key"]["bits"],
                                   group_size=record["key"]["group_size"], bias=linear.bias is not None,
                                   scale_dtype=scale_dtype, device=linear.weight.device)
        with torch.no_grad():
            for tensor_name in GroupwiseIntLinear._QUANT_TENSORS:
                stored = tensors.get(f"{name}.{tensor_name}")
                target = getattr(layer, tensor_name)
                if target is None:
                    continue
                if stored is None or tuple(stored.shape) != tuple(target.shape):
                    raise ValueError(f"cached base {directory}: {name}.{tensor_name} is missing or has another shape; "
                                     "delete the entry")
                target.copy_(stored)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
    return record


def save_base(model: nn.Module, directory: Path, key: dict[str, Any], info: dict[str, Any]) -> None:
    """Write ``model``'s quantized layers as the entry ``directory`` (atomically)."""
    from safetensors.torch import save_file

    from qblora_pl.atomic import atomic_directory
    from qblora_pl.quantization.int_layer import GroupwiseIntLinear

    layers = {name: m for name, m in model.named_modules() if isinstance(m, GroupwiseIntLinear)}
    tensors = {}
    for name, layer in layers.items():
        for tensor_name in GroupwiseIntLinear._QUANT_TENSORS:
            tensor = getattr(layer, tensor_name)
            if tensor is not None:
                tensors[f"{name}.{tensor_name}"] = tensor.detach().cpu().contiguous()
    with atomic_directory(directory) as staging:
        save_file(tensors, str(staging / _TENSORS))
        record = {"format": BASE_CACHE_FORMAT, "key": key, "layers": sorted(layers), **info}
        (staging / _RECORD).write_text(json.dumps(record, indent=2))
