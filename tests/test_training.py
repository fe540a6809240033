"""Training through Lightning on a tiny model: loss falls, checkpoints are adapter-only and resume."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch

from qblora_pl.adapters import LoRA, QABLoRA, QALoRA, QBLoRA
from qblora_pl.data.datamodule import InstructionDataModule
from qblora_pl.checkpoints import AdapterCheckpointMismatch
from qblora_pl.module import QuantizedCausalLM
from qblora_pl.quantization import NF4, GroupwiseInt

METHODS = {
    "qlora": lambda: (NF4(), LoRA(r=4, dropout=0.1)),
    "qblora": lambda: (NF4(), QBLoRA(r=4, dropout=0.1)),
    "qalora": lambda: (GroupwiseInt(bits=4, group_size=32), QALoRA(r=4, dropout=0.1)),
    "qablora": lambda: (GroupwiseInt(bits=4, group_size=32), QABLoRA(budget_rank=4, dropout=0.1)),
}


class LossRecorder(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def _module(model_dir, method="qlora", lr=3e-3) -> QuantizedCausalLM:
    quantization, adapter = METHODS[method]()
    return QuantizedCausalLM(str(model_dir), quantization=quantization, adapter=adapter, learning_rate=lr, warmup_steps=2)


def _data(model_dir, data_dir, **kwargs) -> InstructionDataModule:
    return InstructionDataModule(str(data_dir), tokenizer_name_or_path=str(model_dir), batch_size=8, **kwargs)


def _trainer(tmp_path, recorder=None, **kwargs) -> pl.Trainer:
    defaults = dict(
        default_root_dir=tmp_path,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        gradient_clip_val=0.3,
    )
    defaults.update(kwargs)
    callbacks = defaults.pop("callbacks", []) + ([recorder] if recorder else [])
    return pl.Trainer(callbacks=callbacks, **defaults)


@pytest.mark.parametrize("method", list(METHODS))
def test_loss_falls_and_only_adapters_train(method, tiny_model_dir, tiny_data_dir, tmp_path):
    pl.seed_everything(0)
    module = _module(tiny_model_dir, method)
    recorder = LossRecorder()
    trainer = _trainer(tmp_path, recorder, max_epochs=6, enable_checkpointing=False)
    module.configure_model()
    frozen_before = {n: t.clone() for n, t in module.model.state_dict().items() if "adapter" not in n and "_unmerged" not in n}
    trainer.fit(module, datamodule=_data(tiny_model_dir, tiny_data_dir))
    first, last = sum(recorder.losses[:7]) / 7, sum(recorder.losses[-7:]) / 7
    assert last < first - 0.1, f"{method}: loss {first:.3f} -> {last:.3f} did not fall"
    for name, tensor in module.model.state_dict().items():
        if name in frozen_before:
            assert torch.equal(tensor, frozen_before[name]), f"frozen {name} changed"


def test_checkpoint_holds_adapters_only_and_records_strategy(tiny_model_dir, tiny_data_dir, tmp_path):
    module = _module(tiny_model_dir, "qablora")
    trainer = _trainer(tmp_path, max_steps=3)
    trainer.fit(module, datamodule=_data(tiny_model_dir, tiny_data_dir))
    path = tmp_path / "adapter.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=False)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert set(ckpt["state_dict"]) == trainable and all("balanced_M" in k for k in trainable)
    assert ckpt["adapter_spec"]["strategy"].endswith("QABLoRA")
    assert ckpt["optimizer_states"] and ckpt["loops"]


def test_adapter_checkpoint_refuses_another_strategy(tiny_model_dir, tiny_data_dir, tmp_path):
    module = _module(tiny_model_dir, "qalora")
    trainer = _trainer(tmp_path, max_steps=2)
    trainer.fit(module, datamodule=_data(tiny_model_dir, tiny_data_dir))
    path = tmp_path / "qalora.ckpt"
    trainer.save_checkpoint(path)
    other = _module(tiny_model_dir, "qablora")
    with pytest.raises(AdapterCheckpointMismatch, match="QALoRA but the model uses .*QABLoRA"):
        _trainer(tmp_path, max_steps=4).fit(other, datamodule=_data(tiny_model_dir, tiny_data_dir), ckpt_path=path)


@pytest.mark.parametrize("method", ["qlora", "qablora"])
def test_interrupted_and_resumed_run_reproduces_losses(method, tiny_model_dir, tiny_data_dir, tmp_path):
    """Two epochs straight vs one epoch, a checkpoint, and a resumed second epoch (dropout on)."""
    pl.seed_everything(0)
    straight = LossRecorder()
    _trainer(tmp_path / "a", straight, max_epochs=2, enable_checkpointing=False).fit(
        _module(tiny_model_dir, method), datamodule=_data(tiny_model_dir, tiny_data_dir)
    )

    pl.seed_everything(0)
    first = LossRecorder()
    trainer = _trainer(tmp_path / "b", first, max_epochs=1, enable_checkpointing=False)
    trainer.fit(_module(tiny_model_dir, method), datamodule=_data(tiny_model_dir, tiny_data_dir))
    trainer.save_checkpoint(tmp_path / "epoch1.ckpt")

    pl.seed_everything(0)
    torch.randn(1000)  # the global generators moved on since the save: the checkpoint must carry what matters
    resumed = LossRecorder()
    _trainer(tmp_path / "c", resumed, max_epochs=2, enable_checkpointing=False).fit(
        _module(tiny_model_dir, method), datamodule=_data(tiny_model_dir, tiny_data_dir), ckpt_path=tmp_path / "epoch1.ckpt"
    )
    n = len(first.losses)
    assert n > 0 and len(resumed.losses) == len(straight.losses) - n
    assert first.losses == pytest.approx(straight.losses[:n], abs=1e-6)
    assert resumed.losses == pytest.approx(straight.losses[n:], abs=1e-5)


def test_non_finite_loss_stops_with_a_clear_message(tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch):
    module = _module(tiny_model_dir, "qlora")
    monkeypatch.setattr(QuantizedCausalLM, "_loss", lambda self, batch: torch.tensor(math.nan, requires_grad=True))
    with pytest.raises(FloatingPointError, match="training loss is nan at global step 0"):
        _trainer(tmp_path, max_steps=2).fit(module, datamodule=_data(tiny_model_dir, tiny_data_dir))


def test_missing_model_directory_is_named(tmp_path):
    module = QuantizedCausalLM(str(tmp_path / "no-such-model"))
    with pytest.raises(FileNotFoundError, match="no-such-model.*does not exist"):
        module.configure_model()


def test_unknown_target_module_is_named(tiny_model_dir):
    module = QuantizedCausalLM(str(tiny_model_dir), quantization=GroupwiseInt(), target_modules=["q_proj", "qkv"])
    with pytest.raises(ValueError, match=r"\['qkv'\] match no linear layer.*'down_proj'"):
        module.configure_model()
