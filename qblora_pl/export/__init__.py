"""Merge-to-low-precision export: the project's native INT-b checkpoint, GGUF for llama.cpp,
a merged dense Hugging Face directory and (on request) mlx-lm's quantized layout, each verified
by loading it back (docs/export.md)."""

from qblora_pl.export.exporter import (
    EXPORT_FORMATS,
    ON_REQUEST_FORMATS,
    export_from_checkpoint,
    export_merged,
    export_module,
    module_from_checkpoint,
)
from qblora_pl.export.gguf_tensors import llama_permute_rows, pack_q4_1
from qblora_pl.export.gguf_writer import write_gguf
from qblora_pl.export.hf_dense import write_hf_dense
from qblora_pl.export.mlx_writer import write_mlx
from qblora_pl.export.native import write_native
from qblora_pl.quantization.native_checkpoint import load_native
from qblora_pl.export.snapshot import ExportFallbackWarning, ModelSnapshot, snapshot_merged_model

__all__ = [
    "EXPORT_FORMATS",
    "ON_REQUEST_FORMATS",
    "ExportFallbackWarning",
    "ModelSnapshot",
    "export_from_checkpoint",
    "export_merged",
    "export_module",
    "llama_permute_rows",
    "load_native",
    "module_from_checkpoint",
    "pack_q4_1",
    "snapshot_merged_model",
    "write_gguf",
    "write_hf_dense",
    "write_mlx",
    "write_native",
]
