"""Export formats: one module per format, one registry (:mod:`qblora_pl.export.formats.base`).

Built in, in the order they are written: ``native``, ``gguf``, ``hf`` (written by default), then
``mlx`` and ``compressed-tensors`` (on request: their verification needs an optional package).
"""

from qblora_pl.export.formats.base import (
    ExportContext,
    ExportFormat,
    ExportOptions,
    ExportPlan,
    Requirement,
    UnsupportedExportFormat,
    check_formats,
    check_model_support,
    default_formats,
    export_format,
    register_export_format,
    registered_formats,
    unregister_export_format,
)
from qblora_pl.export.formats.native import NativeFormat  # noqa: I001 - registration order is the write order
from qblora_pl.export.formats.gguf import GGUFFormat
from qblora_pl.export.formats.hf import HFDenseFormat
from qblora_pl.export.formats.mlx import MLXFormat
from qblora_pl.export.formats.compressed_tensors import CompressedTensorsFormat

__all__ = [
    "CompressedTensorsFormat", "ExportContext", "ExportFormat", "ExportOptions", "ExportPlan", "GGUFFormat",
    "HFDenseFormat", "MLXFormat", "NativeFormat", "Requirement", "UnsupportedExportFormat", "check_formats", "check_model_support",
    "default_formats", "export_format", "register_export_format", "registered_formats", "unregister_export_format",
]
