"""``mlx``: mlx-lm's quantized layout (codes kept; scales and biases in float32: exact). On request:
verifying it needs mlx-lm (``pip install -e ".[mlx]"``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from qblora_pl.export.formats.base import (
    Requirement,
    ExportContext,
    ExportFormat,
    ExportOptions,
    ExportPlan,
    UnsupportedExportFormat,
    register_export_format,
)
from qblora_pl.export.mlx_loader import MLX_CLIENT, load_mlx
from qblora_pl.export.mlx_writer import MLX_AFFINE_BITS, MLX_AFFINE_GROUP_SIZES, MLX_MODEL_TYPES, write_mlx


@register_export_format
class MLXFormat(ExportFormat):
    name = "mlx"
    location = "mlx"
    # Importing mlx_lm imports mlx.core, so a missing MLX (or MLX without its CPU backend) fails it too.
    requirements = (Requirement("mlx_lm", "mlx-lm", 'pip install -e ".[mlx]"', verify_only=True),)
    model_types = MLX_MODEL_TYPES

    def check(self, plan: ExportPlan, options: ExportOptions) -> None:
        super().check(plan, options)
        bits, group_size = plan.low_bit
        if plan.merges_into_offsets and (bits not in MLX_AFFINE_BITS or group_size not in MLX_AFFINE_GROUP_SIZES):
            raise UnsupportedExportFormat(
                f"export format 'mlx' stores INT{bits} g{group_size} codes only as bits {MLX_AFFINE_BITS} x group_size "
                f"{MLX_AFFINE_GROUP_SIZES}; drop 'mlx' from formats or train another bits / group_size"
            )

    def write(self, context: ExportContext) -> dict[str, Any]:
        return write_mlx(context.snapshot, context.path(self), context.tokenizer_source)

    def load(self, path: Path) -> tuple[nn.Module, str]:
        return load_mlx(path), MLX_CLIENT
