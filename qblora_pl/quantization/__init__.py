"""Quantized bases: backends chosen in YAML, and the group-wise INT-b layer."""

import logging as _logging


class _DropTorchaoCudaExtensionNotices(_logging.Filter):
    """With torchao installed (the ``fsdp-nf4`` extra), transformers imports it on every model load,
    and torchao warns once per CUDA extension it cannot load into a CPU-only torch ("Failed to load
    .../torchao/_C_mxfp8...so"), and torch warns about enums torchao registers with pytree. NF4 uses
    none of those extensions: only these messages are dropped, every other torchao warning stays."""

    def filter(self, record: _logging.LogRecord) -> bool:
        message = str(record.msg)
        if message.startswith("Failed to load") and "torchao" in message and ".so" in message:
            return False
        return not ("is an Enum subclass and is now natively supported by torch.compile" in message)


_logging.getLogger("torchao").addFilter(_DropTorchaoCudaExtensionNotices())
_logging.getLogger("torch.utils._pytree").addFilter(_DropTorchaoCudaExtensionNotices())

from qblora_pl.quantization.backends import NF4, GroupwiseInt, NoQuantization, QuantizationBackend
from qblora_pl.quantization.int4_kernel import Int4KernelFallbackWarning
from qblora_pl.quantization.int_layer import GroupwiseIntLinear, enable_int4_inference
from qblora_pl.quantization.int_quantizer import GroupwiseIntQuantizer

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
