"""``gguf``: one GGUF file for llama.cpp (Q4_1 blocks, exact for QA-* at INT2/3/4 x g32/64/128)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from qblora_pl.export.formats.base import ExportContext, ExportFormat, Requirement, register_export_format
from qblora_pl.export.gguf_writer import write_gguf
from qblora_pl.export.verify import load_gguf


@register_export_format
class GGUFFormat(ExportFormat):
    name = "gguf"
    location = "model.gguf"
    default = True
    requirements = (Requirement("gguf", "gguf", 'pip install -e . (or pip install "gguf>=0.10")', verify_only=False),)
    model_types = ("llama",)  # the writer maps Llama's tensor names and q/k row order to llama.cpp's

    def write(self, context: ExportContext) -> dict[str, Any]:
        name = str((context.method or {}).get("adapter", {}).get("class", "qblora-export"))
        return write_gguf(context.snapshot, context.path(self), context.tokenizer_source,
                          fallback=context.options.gguf_fallback, dense_type=context.options.gguf_dense_type,
                          name=name)

    def load(self, path: Path) -> tuple[nn.Module, str]:
        return load_gguf(path)
