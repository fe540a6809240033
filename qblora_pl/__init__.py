"""qblora_pl: fine-tune quantized causal LMs with balanced low-rank adaptation, on Lightning."""

__version__ = "0.1.0"
