"""LightningCLI entry point: ``python main.py {fit,validate,test,predict} --config ...``."""

from __future__ import annotations

import torch
from lightning.pytorch.cli import LightningCLI

from qblora_pl.data.instruction import InstructionDataModule
from qblora_pl.module import QuantizedCausalLM


def default_precision() -> str:
    """QLoRA's defaults: bf16 mixed precision on a GPU that supports it, full fp32 on CPU."""
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


class QBLoRACLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # The data module tokenizes with the model's own tokenizer unless told otherwise.
        parser.link_arguments("model.model_name_or_path", "data.tokenizer_name_or_path")
        parser.set_defaults({"trainer.precision": default_precision()})

    def _instantiate_trainer(self, config: dict, callbacks: list):
        from lightning.pytorch.callbacks import ProgressBar

        from callbacks.progress import StepProgressBar

        configured = [*(config.get("callbacks") or []), *callbacks]
        if config.get("enable_progress_bar", True) is not False and not any(isinstance(c, ProgressBar) for c in configured):
            callbacks = [*callbacks, StepProgressBar()]  # "Epoch 0", not Lightning's "Epoch 0/-2"
        return super()._instantiate_trainer(config, callbacks)


def main(args=None) -> QBLoRACLI:
    return QBLoRACLI(
        QuantizedCausalLM,
        InstructionDataModule,
        seed_everything_default=42,
        save_config_kwargs={"overwrite": True},
        args=args,
    )
