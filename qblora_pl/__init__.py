"""qblora_pl: fine-tune quantized causal LMs with balanced low-rank adaptation, on Lightning."""

import logging as _logging

__version__ = "0.1.0"


class _DropOptionalKernelNotice(_logging.Filter):
    """bitsandbytes logs a warning at import on AVX512-BF16 CPUs when the optional hub package
    ``kernels`` is absent ("Failed to load CPU gemm_4bit_forward from kernels-community").
    That kernel only serves bitsandbytes' repacked CPU inference layout, which qblora_pl turns
    off (it has no autograd: qblora_pl.quantization.base_layers.keep_nf4_layers_trainable), so
    the notice is noise on every start. Only that message is dropped."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward")


_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropOptionalKernelNotice())
