"""Quantized bases: backends chosen in YAML, and the group-wise INT-b layer."""

from qblora_pl.quantization.backends import NF4, GroupwiseInt, NoQuantization, QuantizationBackend
from qblora_pl.quantization.groupwise_int import GroupwiseIntLinear, GroupwiseIntQuantizer

__all__ = ["NF4", "GroupwiseInt", "GroupwiseIntLinear", "GroupwiseIntQuantizer", "NoQuantization", "QuantizationBackend"]
