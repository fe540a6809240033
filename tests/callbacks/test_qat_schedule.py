"""QAT schedule: the phases, the train == export invariant, gradients, and resume."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from qblora_pl.callbacks.qat_schedule import QATPhase, QATSchedule
from qblora_pl.adapters import LoRA, QABLoRA, QBLoRA
from qblora_pl.adapters.injection import adapted_layers
from qblora_pl.data.datamodule import InstructionDataModule
from qblora_pl.merging import merge_adapters, requantize_merged
from qblora_pl.module import QuantizedCausalLM
from qblora_pl.qat import MergedOffsetFakeQuant, MergedWeightFakeQuant
from qblora_pl.quantization import NF4, GroupwiseInt


def test_phases_follow_start_ramp_and_annealing():
    schedule = QATSchedule(start_step=10, ramp_steps=4, bits=4, anneal_bits=[8, 6], anneal_steps=5)
    assert schedule.phase(9) == QATPhase(False, 4, 0.0)
    assert schedule.phase(10) == QATPhase(True, 8, 0.25)
    assert schedule.phase(13) == QATPhase(True, 8, 1.0)
    assert schedule.phase(15).bits == 6
    assert schedule.phase(20).bits == 4 and schedule.phase(1000) == QATPhase(True, 4, 1.0)


@pytest.mark.parametrize("kwargs, message", [(dict(bits=5), "bits=5"), (dict(group_size=48), "group_size=48"), (dict(anneal_bits=[8]), "anneal_steps")])
def test_bad_schedule_is_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QATSchedule(**kwargs)


def _module(model_dir, quantization, adapter) -> QuantizedCausalLM:
    module = QuantizedCausalLM(str(model_dir), quantization=quantization, adapter=adapter)
    module.configure_model()
    torch.manual_seed(3)
    with torch.no_grad():
        for layer in adapted_layers(module.model).values():
            for p in layer.adapter.parameters():
                p.normal_(0, 0.05)
    return module


@pytest.mark.parametrize("strategy", [LoRA(r=4, dropout=0.0), QBLoRA(r=4, dropout=0.0)])
def test_fake_quantized_training_model_equals_requantized_export(strategy, tiny_model_dir):
    """The invariant: what QAT trains on is exactly what merge + INT4 re-quantization writes."""
    module = _module(tiny_model_dir, NF4(), strategy)
    ids = torch.randint(3, module.model.config.vocab_size, (2, 12))
    for layer in adapted_layers(module.model).values():
        layer.fake_quant = MergedWeightFakeQuant(bits=4, group_size=32)
    with torch.no_grad():
        trained = module.model(ids).logits
    for layer in adapted_layers(module.model).values():
        layer.fake_quant = None
    with torch.no_grad():
        plain = module.model(ids).logits
    merge_adapters(module.model)
    requantize_merged(module.model, bits=4, group_size=32)
    with torch.no_grad():
        exported = module.model(ids).logits
    torch.testing.assert_close(trained, exported, atol=1e-5, rtol=0)
    assert (plain - exported).abs().max() > 1e-3, "re-quantization must change the model"


def test_offset_fake_quant_equals_fp16_rounded_merge(tiny_model_dir):
    module = _module(tiny_model_dir, GroupwiseInt(bits=4, group_size=32), QABLoRA(budget_rank=4, dropout=0.0))
    ids = torch.randint(3, module.model.config.vocab_size, (2, 12))
    for layer in adapted_layers(module.model).values():
        layer.fake_quant = MergedOffsetFakeQuant(zero_point="float16")
    with torch.no_grad():
        trained = module.model(ids).logits
    for layer in adapted_layers(module.model).values():
        layer.fake_quant = None
    merge_adapters(module.model)
    for layer in adapted_layers(module.model).values():
        layer.base_layer.offsets = layer.base_layer.offsets.half().float()
    with torch.no_grad():
        exported = module.model(ids).logits
    torch.testing.assert_close(trained, exported, atol=1e-5, rtol=0)


@pytest.mark.parametrize("fake_quant", [MergedWeightFakeQuant(bits=4), MergedOffsetFakeQuant(zero_point="integer")])
def test_gradients_reach_the_adapter_through_the_rounding(fake_quant, tiny_model_dir):
    if isinstance(fake_quant, MergedWeightFakeQuant):
        module = _module(tiny_model_dir, NF4(), LoRA(r=4, dropout=0.0))
    else:
        module = _module(tiny_model_dir, GroupwiseInt(), QABLoRA(budget_rank=4, dropout=0.0))
    for layer in adapted_layers(module.model).values():
        layer.fake_quant = fake_quant
    ids = torch.randint(3, module.model.config.vocab_size, (2, 12))
    module.model(ids, labels=ids).loss.backward()
    grads = [p.grad for p in module.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


class PhaseRecorder(pl.Callback):
    def __init__(self, schedule: QATSchedule) -> None:
        self.schedule, self.seen, self.losses = schedule, [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        layer = next(iter(adapted_layers(pl_module).values()))
        fq = layer.fake_quant
        self.seen.append((trainer.global_step - 1, fq is not None, getattr(fq, "bits", None), getattr(fq, "strength", None)))
        self.losses.append(float(outputs["loss"]))


def _fit(tmp_path, model_dir, data_dir, max_epochs, ckpt_path=None):
    pl.seed_everything(0)
    schedule = QATSchedule(start_step=3, ramp_steps=3, bits=4, anneal_bits=[8], anneal_steps=4, log_every_n_steps=1)
    recorder = PhaseRecorder(schedule)
    trainer = pl.Trainer(
        default_root_dir=tmp_path, accelerator="cpu", logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
        max_epochs=max_epochs, callbacks=[schedule, recorder],
    )
    module = QuantizedCausalLM(str(model_dir), quantization=NF4(), adapter=LoRA(r=4, dropout=0.0), learning_rate=3e-3)
    data = InstructionDataModule(str(data_dir), tokenizer_name_or_path=str(model_dir), batch_size=8)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return trainer, schedule, recorder


def test_schedule_continues_across_resume(tiny_model_dir, tiny_data_dir, tmp_path):
    _, _, straight = _fit(tmp_path / "a", tiny_model_dir, tiny_data_dir, max_epochs=2)
    trainer, schedule, first = _fit(tmp_path / "b", tiny_model_dir, tiny_data_dir, max_epochs=1)
    trainer.save_checkpoint(tmp_path / "epoch1.ckpt")
    _, resumed_schedule, resumed = _fit(tmp_path / "c", tiny_model_dir, tiny_data_dir, max_epochs=2, ckpt_path=tmp_path / "epoch1.ckpt")

    assert resumed_schedule.restored_phase == schedule.applied
    assert first.seen + resumed.seen == straight.seen
    steps_on = [s for s in straight.seen if s[1]]
    assert steps_on and steps_on[0][0] == 3 and steps_on[0][2] == 8  # annealing starts at 8 bits
    assert any(s[2] == 4 for s in steps_on)
    assert first.losses + resumed.losses == pytest.approx(straight.losses, abs=1e-5)
