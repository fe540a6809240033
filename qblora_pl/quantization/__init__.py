"""Quantized bases: backends chosen in YAML, and the group-wise INT-b layer."""

from qblora_pl.quantization.backends import NF4, GroupwiseInt, NoQuantization, QuantizationBackend
from qblora_pl.quantization.groupwise_int import (
    GroupwiseIntLinear,
    GroupwiseIntQuantizer,
    Int4KernelFallbackWarning,
    enable_int4_inference,
)

__all__ = [
    "NF4",
    "GroupwiseInt",
    "GroupwiseIntLinear",
    "GroupwiseIntQuantizer",
    "Int4KernelFallbackWarning",
    "NoQuantization",
    "QuantizationBackend",
    "enable_int4_inference",
]
