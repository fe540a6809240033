"""``native``: the project's INT-b checkpoint (safetensors codes, scales, offsets), :func:`qblora_pl.export.load_native`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from qblora_pl.export.formats.base import ExportContext, ExportFormat, register_export_format
from qblora_pl.export.native import write_native
from qblora_pl.quantization.native_checkpoint import load_native


@register_export_format
class NativeFormat(ExportFormat):
    name = "native"
    location = "native"
    default = True

    def write(self, context: ExportContext) -> dict[str, Any]:
        return write_native(context.snapshot, context.path(self), context.tokenizer_source,
                            bits=context.options.native_bits, group_size=context.options.native_group_size,
                            method=context.method)

    def load(self, path: Path) -> tuple[nn.Module, str]:
        return load_native(path), "qblora_pl.export.load_native"
