"""Instruction data: prompt templates and the LightningDataModule."""

from qblora_pl.data.instruction import IGNORE_INDEX, InstructionDataModule
from qblora_pl.data.prompts import PromptTemplate, format_prompt, get_template

__all__ = ["IGNORE_INDEX", "InstructionDataModule", "PromptTemplate", "format_prompt", "get_template"]
