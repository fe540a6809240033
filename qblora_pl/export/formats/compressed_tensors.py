"""``compressed-tensors``: the ``pack-quantized`` layout vLLM and SGLang serve (integer zero points). On
request: verifying it needs compressed-tensors (``pip install -e ".[vllm]"``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from qblora_pl.export.compressed_tensors_writer import (
    CT_BITS,
    CT_CLIENT,
    CT_GROUP_SIZES,
    load_compressed_tensors,
    write_compressed_tensors,
)
from qblora_pl.export.formats.base import (
    Requirement,
    ExportContext,
    ExportFormat,
    ExportOptions,
    ExportPlan,
    UnsupportedExportFormat,
    register_export_format,
)


@register_export_format
class CompressedTensorsFormat(ExportFormat):
    name = "compressed-tensors"
    location = "compressed-tensors"
    requirements = (Requirement("compressed_tensors", "compressed-tensors", 'pip install -e ".[vllm]"',
                                verify_only=True),)

    def check(self, plan: ExportPlan, options: ExportOptions) -> None:
        super().check(plan, options)
        bits, group_size = plan.low_bit
        if bits not in CT_BITS or group_size not in CT_GROUP_SIZES:
            setting = "the base's bits / group_size" if plan.merges_into_offsets else "native_bits / native_group_size"
            raise UnsupportedExportFormat(
                f"export format 'compressed-tensors' writes bits {CT_BITS} x group_size {CT_GROUP_SIZES}, not INT{bits} "
                f"g{group_size} ({setting}); drop it from formats or change {setting}"
            )

    def write(self, context: ExportContext) -> dict[str, Any]:
        integer = context.trained_with_integer_zero_points
        return write_compressed_tensors(
            context.snapshot, context.path(self), context.tokenizer_source,
            # dense merges (LoRA / Q-BLoRA) are re-quantized like the native export's, by RTN
            fallback="requantize", bits=context.options.native_bits, group_size=context.options.native_group_size,
            round_zero_points=context.options.round_zero_points or integer,
            rounding_reason="trained with QATSchedule zero_point: integer" if integer else None,
        )

    def load(self, path: Path) -> tuple[nn.Module, str]:
        return load_compressed_tensors(path), CT_CLIENT
