"""Compatibility re-exports: the instruction data used to live in this one module.

Now split by job: :mod:`qblora_pl.data.records` (reading and validating records),
:mod:`qblora_pl.data.tokenization` (templates, loss labels, truncation, batching),
:mod:`qblora_pl.data.sampler` (training order) and :mod:`qblora_pl.data.datamodule`
(:class:`InstructionDataModule`). Import from those in new code.
"""

from qblora_pl.data.datamodule import InstructionDataModule
from qblora_pl.data.records import (
    SPLITS,
    RecordError,
    load_instruction_splits,
    load_json_records,
    load_record_splits,
    split_indices,
    validate_records,
)
from qblora_pl.data.sampler import LengthGroupedSampler, LengthSortedSampler, RankShareSampler
from qblora_pl.data.tokenization import (
    IGNORE_INDEX,
    InstructionCollator,
    TokenizedInstructions,
    tokenize_conversations,
    tokenize_records,
)

__all__ = [
    "IGNORE_INDEX", "SPLITS", "InstructionCollator", "InstructionDataModule", "LengthGroupedSampler",
    "LengthSortedSampler", "RankShareSampler", "RecordError", "TokenizedInstructions", "load_instruction_splits",
    "load_json_records", "load_record_splits", "split_indices", "tokenize_conversations", "tokenize_records",
    "validate_records",
]
