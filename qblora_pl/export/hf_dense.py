"""A merged 16-bit (or 32-bit) Hugging Face model directory: ``W_hat + dW`` as plain weights.

The deployment path of docs/method.md section 2 ("merge dW into the dequantized base"): every linear
layer becomes a dense ``nn.Linear`` weight in ``dense_dtype``; the directory holds
``config.json`` (without any quantization config), ``model.safetensors`` and the tokenizer, so
``AutoModelForCausalLM.from_pretrained(directory)`` loads it with no project code.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from qblora_pl.atomic import atomic_directory
from qblora_pl.dtypes import dtype_name
from qblora_pl.export.snapshot import ModelSnapshot
from qblora_pl.export.tokenizer_files import copy_tokenizer_files


def write_hf_dense(
    snapshot: ModelSnapshot,
    path: str | Path,
    tokenizer_source: str | Path,
    dense_dtype: torch.dtype = torch.float16,
) -> dict[str, Any]:
    """Write ``snapshot`` as a dense Hugging Face model directory at ``path`` (atomically).

    Raises FloatingPointError naming the tensor if a weight is not finite in ``dense_dtype``
    (e.g. a merged weight beyond the float16 range).
    """
    tensors: dict[str, torch.Tensor] = {}
    for name, linear in snapshot.linears.items():
        tensors[f"{name}.weight"] = linear.dense_weight().to(dense_dtype).contiguous()
        if linear.bias is not None:
            tensors[f"{name}.bias"] = linear.bias.to(dense_dtype).contiguous()
    for key, tensor in snapshot.others.items():
        tensors[key] = (tensor.to(dense_dtype) if tensor.is_floating_point() else tensor).contiguous()
    if snapshot.tied_embeddings:
        tensors.pop("lm_head.weight", None)
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise FloatingPointError(
                f"tensor {key}: {bad} values are not finite in {dtype_name(dense_dtype)}; export aborted"
            )

    config = copy.deepcopy(snapshot.config)
    config.dtype = dense_dtype
    path = Path(path)
    with atomic_directory(path) as tmp:
        config.save_pretrained(tmp)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer = copy_tokenizer_files(tokenizer_source, tmp)
    return {
        "path": str(path),
        "bytes": (path / "model.safetensors").stat().st_size,
        "dtype": dtype_name(dense_dtype),
        "tokenizer_files": tokenizer,
    }
