"""Instruction and chat data: records, prompt/chat templates, tokenization and the LightningDataModule."""

from qblora_pl.data.datamodule import InstructionDataModule
from qblora_pl.data.prompts import PromptTemplate, format_prompt, get_template
from qblora_pl.data.tokenization import IGNORE_INDEX

__all__ = ["IGNORE_INDEX", "InstructionDataModule", "PromptTemplate", "format_prompt", "get_template"]
