"""``hf``: the merged model as a dense Hugging Face directory (16-bit by default)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from qblora_pl.export.formats.base import ExportContext, ExportFormat, register_export_format
from qblora_pl.export.hf_dense import write_hf_dense
from qblora_pl.dtypes import dtype_from_name
from qblora_pl.export.verify import load_hf_dense


@register_export_format
class HFDenseFormat(ExportFormat):
    name = "hf"
    location = "hf"
    default = True

    def write(self, context: ExportContext) -> dict[str, Any]:
        return write_hf_dense(context.snapshot, context.path(self), context.tokenizer_source,
                              dtype_from_name(context.options.dense_dtype))

    def load(self, path: Path) -> tuple[nn.Module, str]:
        return load_hf_dense(path), "transformers AutoModelForCausalLM (float32 compute)"
