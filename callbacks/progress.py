"""The progress bar of every ``main.py`` run: Lightning's rich bar, told about step-bounded runs.

Runs here are bounded by ``trainer.max_steps`` and leave ``max_epochs`` unset, which Lightning
stores as ``-1``; its bar then reads "Epoch 0/-2". This bar says "Epoch 0" in that case and
"Epoch 0/2" when the run is bounded by epochs.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar


class StepProgressBar(RichProgressBar):
    def _get_train_description(self, current_epoch: int) -> str:
        description = f"Epoch {current_epoch}"
        max_epochs = self.trainer.max_epochs
        if max_epochs is not None and max_epochs > 0:
            description += f"/{max_epochs - 1}"
        if len(self.validation_description) > len(description):
            description = f"{description:{len(self.validation_description)}}"
        return description
