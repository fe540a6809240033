"""Adapter strategies: one small class per method, chosen in YAML by ``class_path``."""

from qblora_pl.adapters.base import AdaptedLinear, AdapterConfigError, AdapterModule, AdapterStrategy, GroupConstantAdapter
from qblora_pl.adapters.lora import LoRA
from qblora_pl.adapters.qablora import QABLoRA
from qblora_pl.adapters.qalora import QALoRA
from qblora_pl.adapters.qblora import QBLoRA

__all__ = [
    "AdaptedLinear",
    "AdapterConfigError",
    "AdapterModule",
    "AdapterStrategy",
    "GroupConstantAdapter",
    "LoRA",
    "QABLoRA",
    "QALoRA",
    "QBLoRA",
]
