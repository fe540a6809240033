"""RankBalanceDiagnostics: its numbers equal a dense SVD of dW, it logs on schedule, to TensorBoard."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import Logger, TensorBoardLogger

from qblora_pl.callbacks.rank_balance import RankBalanceDiagnostics, spectrum_statistics
from qblora_pl.adapters import LoRA, QABLoRA, QALoRA, QBLoRA
from qblora_pl.data.datamodule import InstructionDataModule
from qblora_pl.module import QuantizedCausalLM
from qblora_pl.quantization import GroupwiseInt, NoQuantization
from qblora_pl.quantization.base_layers import dequantized_weight

METHODS = {
    "lora": lambda: (NoQuantization(), LoRA(r=4, dropout=0.0)),
    "qblora": lambda: (NoQuantization(), QBLoRA(r=4, dropout=0.0)),
    "qalora": lambda: (GroupwiseInt(bits=4, group_size=32), QALoRA(r=4, dropout=0.0)),
    "qablora": lambda: (GroupwiseInt(bits=4, group_size=32), QABLoRA(budget_rank=4, dropout=0.0)),
}




class RecordingLogger(Logger):
    """Keeps every log_metrics call (the rank-balance ones) in memory."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, dict]] = []

    @property
    def name(self):
        return "recording"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        ours = {k: v for k, v in metrics.items() if k.startswith("rank_balance/")}
        if ours:
            self.calls.append((step, ours))


def _module(model_dir, method: str) -> QuantizedCausalLM:
    quantization, adapter = METHODS[method]()
    module = QuantizedCausalLM(str(model_dir), quantization=quantization, adapter=adapter, learning_rate=3e-3, warmup_steps=0)
    module.configure_model()
    return module


def _fit(model_dir, data_dir, root, callback, max_steps, method="lora", **kwargs) -> pl.Trainer:
    defaults = dict(
        default_root_dir=root,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        max_steps=max_steps,
    )
    ckpt_path = kwargs.pop("ckpt_path", None)
    defaults.update(kwargs)
    trainer = pl.Trainer(callbacks=[callback], **defaults)
    data = InstructionDataModule(str(data_dir), tokenizer_name_or_path=str(model_dir), batch_size=8)
    trainer.fit(_module(model_dir, method), datamodule=data, ckpt_path=ckpt_path)
    return trainer


def _reference(delta: torch.Tensor, top_k: int) -> tuple[float, float, list[float]]:
    """Effective rank, stable rank and top-k from a dense SVD, written out independently."""
    s = torch.linalg.svdvals(delta.double())
    p = s / s.sum()
    entropy = -sum(float(v * math.log(v)) for v in p if v > 0)
    return math.exp(entropy), float((s**2).sum() / s[0] ** 2), [float(v) for v in s[:top_k]]


@pytest.mark.parametrize("method", list(METHODS))
def test_statistics_match_dense_svd_of_the_update(method, tiny_model_dir):
    torch.manual_seed(0)
    module = _module(tiny_model_dir, method)
    for p in module.model.parameters():
        if p.requires_grad:  # non-zero factors: a test must not pass on an untrained adapter
            torch.nn.init.normal_(p, std=0.05)
    callback = RankBalanceDiagnostics(top_k=3)
    spectra = callback.measure(module)
    layers = module.adapted_layers()
    assert set(spectra) == set(layers) and len(layers) == 14
    for name, layer in layers.items():
        delta = layer.adapter.delta_weight().detach()
        effective, stable, top = _reference(delta, 3)
        got = spectra[name]
        assert got.effective_rank == pytest.approx(effective, rel=1e-4), name
        assert got.stable_rank == pytest.approx(stable, rel=1e-4), name
        assert got.max_rank == int(torch.linalg.matrix_rank(delta.double(), rtol=1e-4)), name
        # dense SVD values past the structural rank are round-off; the adapter reports none
        assert got.top == pytest.approx(top[: got.max_rank], rel=1e-4), name
        base = dequantized_weight(layer.base_layer, torch.float32)
        assert callback.relative_update_norm(layer, got) == pytest.approx(
            float(delta.norm() / base.norm()), rel=1e-4
        )
    summary = callback.group_summary(module, spectra)
    assert list(summary) == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "all"]
    assert summary["all"]["layers"] == 14


def test_balanced_update_reaches_more_rank_than_lora_at_equal_budget(tiny_model_dir):
    torch.manual_seed(0)
    ranks = {}
    for method in ("lora", "qblora"):
        module = _module(tiny_model_dir, method)
        for p in module.model.parameters():
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.05)
        summary = RankBalanceDiagnostics().group_summary(module, RankBalanceDiagnostics().measure(module))
        ranks[method] = summary["q_proj"]
    assert ranks["lora"]["max_rank"] == 4 and ranks["qblora"]["max_rank"] == 8
    assert ranks["qblora"]["effective_rank"] > ranks["lora"]["max_rank"]


@pytest.mark.parametrize("method", ["lora", "qablora"])
def test_zero_update_at_initialisation_has_rank_zero_and_no_nan(method, tiny_model_dir):
    module = _module(tiny_model_dir, method)  # LoRA's B = 0, QA-BLoRA's M = 0
    callback = RankBalanceDiagnostics()
    spectra = callback.measure(module)
    for s in spectra.values():
        assert (s.effective_rank, s.stable_rank, s.frobenius_norm) == (0.0, 0.0, 0.0)
    summary = callback.group_summary(module, spectra)
    assert all(not math.isnan(v) for row in summary.values() for k, v in row.items() if k != "shape")
    assert spectrum_statistics(torch.empty(0)).effective_rank == 0.0


def test_effective_rank_of_known_spectra():
    assert spectrum_statistics(torch.tensor([1.0, 1.0, 1.0, 1.0])).effective_rank == pytest.approx(4.0)
    assert spectrum_statistics(torch.tensor([2.0, 0.0, 0.0])).effective_rank == pytest.approx(1.0)
    flat = spectrum_statistics(torch.tensor([3.0, 4.0]))  # sorted inside
    assert flat.stable_rank == pytest.approx(25 / 16) and flat.top == [4.0, 3.0]
    assert math.isnan(spectrum_statistics(torch.tensor([float("inf"), 1.0])).effective_rank)


def test_logs_exactly_at_multiples_of_every_n_steps_and_at_the_end(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    logger = RecordingLogger()
    callback = RankBalanceDiagnostics(every_n_steps=3)
    # Gradient accumulation: several batches share a global step, yet each step logs once.
    _fit(tiny_model_dir, tiny_data_dir, tmp_path, callback, max_steps=7, logger=logger, accumulate_grad_batches=2)
    assert [step for step, _ in logger.calls] == [3, 6, 7]
    for step, metrics in logger.calls:
        assert metrics["rank_balance/effective_rank_mean"] > 0
        assert "rank_balance/effective_rank/q_proj" in metrics and "rank_balance/top_singular_value/down_proj/4" in metrics
        # the gradient exists only on optimizer steps, not at the end of training
        assert ("rank_balance/grad_norm" in metrics) == (step != 7)
    assert callback.state_dict() == {"last_logged_step": 7}
    assert "Rank balance of the adapter updates at step 7" in capsys.readouterr().out


def test_resume_does_not_log_a_step_twice(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    first = RecordingLogger()
    trainer = _fit(tiny_model_dir, tiny_data_dir, tmp_path, RankBalanceDiagnostics(every_n_steps=2, print_summary=False), 4, logger=first)
    assert [s for s, _ in first.calls] == [2, 4]
    trainer.save_checkpoint(tmp_path / "step4.ckpt")
    resumed_logger, resumed = RecordingLogger(), RankBalanceDiagnostics(every_n_steps=2, print_summary=False)
    _fit(tiny_model_dir, tiny_data_dir, tmp_path, resumed, 5, logger=resumed_logger, ckpt_path=tmp_path / "step4.ckpt")
    assert [s for s, _ in resumed_logger.calls] == [5]
    # resumed at the very end: nothing trains, nothing is logged again, the summary still prints
    at_end_logger, at_end = RecordingLogger(), RankBalanceDiagnostics(every_n_steps=2)
    _fit(tiny_model_dir, tiny_data_dir, tmp_path, at_end, 4, logger=at_end_logger, ckpt_path=tmp_path / "step4.ckpt")
    assert at_end_logger.calls == [] and at_end.latest and "at step 4" in capsys.readouterr().out


def test_tensorboard_gets_scalars_histograms_and_spectrum_figure(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    _fit(tiny_model_dir, tiny_data_dir, tmp_path, RankBalanceDiagnostics(every_n_steps=2), 4, method="qblora", logger=logger)
    logger.experiment.flush()
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "histograms": 0, "scalars": 0}).Reload()
    tags = events.Tags()
    for tag in ("rank_balance/effective_rank/q_proj", "rank_balance/stable_rank/down_proj", "rank_balance/effective_rank_mean",
                "rank_balance/relative_update_norm/up_proj", "rank_balance/grad_norm"):
        assert tag in tags["scalars"], tag
    assert [e.step for e in events.Scalars("rank_balance/effective_rank_mean")] == [2, 4]
    assert "rank_balance/singular_values/q_proj" in tags["histograms"]
    assert [e.step for e in events.Images("rank_balance/spectrum")] == [2, 4]
    out = capsys.readouterr().out
    assert "eff. rank" in out and "down_proj" in out and "all" in out


def test_without_a_logger_it_only_prints(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    _fit(tiny_model_dir, tiny_data_dir, tmp_path, RankBalanceDiagnostics(every_n_steps=1), 2)
    assert "stable rank" in capsys.readouterr().out


def test_configurable_from_yaml_through_the_cli(tmp_path, monkeypatch):
    import sys
    from unittest import mock

    from qblora_pl.cli import QBLoRACLI

    monkeypatch.chdir(tmp_path)
    (tmp_path / "rank.yaml").write_text(
        "trainer:\n  callbacks:\n    - class_path: qblora_pl.callbacks.RankBalanceDiagnostics\n"
        "      init_args:\n        every_n_steps: 25\n        log_images: false\n"
    )
    with mock.patch.object(sys, "argv", ["main.py"]):
        cli = QBLoRACLI(QuantizedCausalLM, InstructionDataModule, run=False, args=["--config", str(tmp_path / "rank.yaml")])
    [callback] = [c for c in cli.trainer.callbacks if isinstance(c, RankBalanceDiagnostics)]
    assert (callback.every_n_steps, callback.log_images, callback.top_k) == (25, False, 4)
