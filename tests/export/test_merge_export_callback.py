"""The MergeExport callback at the end of fit, and the same export from a saved checkpoint."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch

from qblora_pl.callbacks.merge_export import MergeExport
from qblora_pl.adapters import QABLoRA
from qblora_pl.data.datamodule import InstructionDataModule
from qblora_pl.export import export_from_checkpoint, load_native
from qblora_pl.module import QuantizedCausalLM
from qblora_pl.quantization import GroupwiseInt


def test_callback_exports_at_fit_end_and_checkpoint_export_matches(tiny_model_dir, tiny_data_dir, tmp_path):
    pl.seed_everything(0)
    module = QuantizedCausalLM(
        str(tiny_model_dir), quantization=GroupwiseInt(), adapter=QABLoRA(budget_rank=4, dropout=0.0),
        learning_rate=3e-2, warmup_steps=0,
    )
    data = InstructionDataModule(str(tiny_data_dir), tokenizer_name_or_path=str(tiny_model_dir), batch_size=8)
    callback = MergeExport(formats=["native", "hf"], dense_dtype="float32")
    trainer = pl.Trainer(
        default_root_dir=tmp_path, accelerator="cpu", max_steps=3, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=[callback],
    )
    trainer.fit(module, datamodule=data)

    out = tmp_path / "exports"  # relative output_dir resolves under default_root_dir
    report = json.loads((out / "export_report.json").read_text())
    assert list(report["formats"]) == list(callback.report["formats"]) == ["native", "hf"]
    assert report["validation"]["batch_source"] == "val_dataloader"
    assert report["validation"]["merged_vs_unmerged"]["max_abs_logit_diff"] < 1e-4
    assert report["formats"]["native"]["verification"]["max_abs_logit_diff"] == 0.0
    assert report["formats"]["hf"]["verification"]["max_abs_logit_diff"] < 1e-4
    trained = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    assert any(t.abs().max() > 0 for t in trained.values()), "adapters did not train; the test would prove nothing"

    ckpt = tmp_path / "adapter.ckpt"
    trainer.save_checkpoint(ckpt)
    again = export_from_checkpoint(None, ckpt, tmp_path / "from_ckpt", formats=["native"], log=lambda _: None)
    assert again["method"]["adapter"]["class"] == "QABLoRA"
    first = load_native(out / "native")
    second = load_native(tmp_path / "from_ckpt" / "native")
    ids = torch.tensor([[1, 5, 9, 23, 42, 7]])
    with torch.no_grad():
        assert torch.equal(first(input_ids=ids).logits, second(input_ids=ids).logits)


def _module_and_data(tiny_model_dir, tiny_data_dir):
    module = QuantizedCausalLM(
        str(tiny_model_dir), quantization=GroupwiseInt(), adapter=QABLoRA(budget_rank=4, dropout=0.0),
        learning_rate=3e-2, warmup_steps=0,
    )
    data = InstructionDataModule(str(tiny_data_dir), tokenizer_name_or_path=str(tiny_model_dir), batch_size=8)
    return module, data


def _trainer(tmp_path, callback, max_steps=2, **kwargs):
    from lightning.pytorch.loggers import TensorBoardLogger

    return pl.Trainer(
        default_root_dir=tmp_path, accelerator="cpu", max_steps=max_steps, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=[callback], logger=TensorBoardLogger(tmp_path / "runs", name="m"), **kwargs,
    )


def test_every_run_exports_into_its_own_log_dir(tiny_model_dir, tiny_data_dir, tmp_path):
    """Two fits with the same config: two exports, neither replacing the other (issue 14)."""
    reports = []
    for _ in range(2):
        module, data = _module_and_data(tiny_model_dir, tiny_data_dir)
        callback = MergeExport(formats=["native"], verify=False)
        _trainer(tmp_path, callback).fit(module, datamodule=data)
        reports.append(callback.report)
    paths = [r["report_path"] for r in reports]
    assert paths == [str(tmp_path / "runs" / "m" / f"version_{i}" / "exports" / "export_report.json") for i in (0, 1)]
    ids = [json.loads(open(p).read())["run"]["id"] for p in paths]
    assert ids[0] != ids[1]
    assert not (tmp_path / "exports").exists()


def test_a_named_dir_holding_another_runs_export_stops_fit_before_training(tiny_model_dir, tiny_data_dir, tmp_path):
    import pytest

    from qblora_pl.export.exporter import ExportDestinationError

    shared = tmp_path / "shared_exports"
    module, data = _module_and_data(tiny_model_dir, tiny_data_dir)
    _trainer(tmp_path, MergeExport(output_dir=str(shared), formats=["native"], verify=False)).fit(module, datamodule=data)
    before = (shared / "export_report.json").read_bytes()

    module, data = _module_and_data(tiny_model_dir, tiny_data_dir)
    trainer = _trainer(tmp_path, MergeExport(output_dir=str(shared), formats=["native"], verify=False))
    with pytest.raises(ExportDestinationError, match="holds the export of another run"):
        trainer.fit(module, datamodule=data)
    assert trainer.global_step == 0  # refused before any training
    assert (shared / "export_report.json").read_bytes() == before

    module, data = _module_and_data(tiny_model_dir, tiny_data_dir)
    callback = MergeExport(output_dir=str(shared), formats=["native"], verify=False, overwrite=True)
    _trainer(tmp_path, callback).fit(module, datamodule=data)
    assert json.loads((shared / "export_report.json").read_text())["run"]["id"] == callback.run_id


def test_a_resumed_run_may_replace_its_own_export(tiny_model_dir, tiny_data_dir, tmp_path):
    shared = tmp_path / "shared_exports"
    module, data = _module_and_data(tiny_model_dir, tiny_data_dir)
    first = MergeExport(output_dir=str(shared), formats=["native"], verify=False)
    trainer = _trainer(tmp_path, first)
    trainer.fit(module, datamodule=data)
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)

    module, data = _module_and_data(tiny_model_dir, tiny_data_dir)
    resumed = MergeExport(output_dir=str(shared), formats=["native"], verify=False)
    _trainer(tmp_path, resumed, max_steps=4).fit(module, datamodule=data, ckpt_path=str(ckpt))
    assert resumed.run_id == first.run_id
    report = json.loads((shared / "export_report.json").read_text())
    assert report["run"]["global_step"] == 4 and report["run"]["resumed_from"] == str(ckpt)


def test_a_run_without_steps_warns_that_it_exports_untrained_adapters(tiny_model_dir, tiny_data_dir, tmp_path):
    import pytest

    module, data = _module_and_data(tiny_model_dir, tiny_data_dir)
    with pytest.warns(UserWarning, match="no optimizer step was taken"):
        _trainer(tmp_path, MergeExport(formats=["native"], verify=False), max_steps=0).fit(module, datamodule=data)


def test_checkpoint_export_verifies_on_the_runs_held_out_records(tiny_model_dir, tiny_data_dir, tmp_path):
    from qblora_pl.export.cli import main as export_main

    module, data = _module_and_data(tiny_model_dir, tiny_data_dir)
    trainer = _trainer(tmp_path, MergeExport(formats=["native"], verify=False))
    trainer.fit(module, datamodule=data)
    run_dir = tmp_path / "runs" / "m" / "version_0"
    ckpt = run_dir / "checkpoints" / "adapter.ckpt"
    trainer.save_checkpoint(ckpt)
    fit_export = (run_dir / "exports" / "export_report.json").read_bytes()

    report = export_main(["--ckpt_path", str(ckpt), "--formats", "native", "--verify_records", "3"])
    # the run's dir by default, one directory per checkpoint, beside the fit's own export
    assert report["report_path"] == str(run_dir / "exports_adapter" / "export_report.json")
    assert (run_dir / "exports" / "export_report.json").read_bytes() == fit_export
    validation = report["validation"]
    assert validation["batch_source"] == f"validation split of {tiny_data_dir} (first 3 records)"
    assert validation["batch_shape"][0] == 3
    assert report["run"]["checkpoint"] == str(ckpt.resolve()) and report["run"]["global_step"] == 2
    assert report["formats"]["native"]["verification"]["max_abs_logit_diff"] == 0.0


# ---------------------------------------------------------------- checked before training (issue 35)
def test_a_format_missing_its_package_stops_fit_before_the_model_loads(tiny_model_dir, tiny_data_dir, tmp_path,
                                                                        monkeypatch):
    """formats: [native, mlx] on a plain `pip install -e .`: refused at fit start, not after training."""
    import sys

    monkeypatch.setitem(sys.modules, "mlx_lm", None)  # mlx-lm absent, also where it is installed
    module, data = _module_and_data(tiny_model_dir, tiny_data_dir)
    trainer = _trainer(tmp_path, MergeExport(formats=["native", "mlx"]))
    with pytest.raises(ImportError) as caught:
        trainer.fit(module, datamodule=data)
    assert module.model is None, "configure_model ran: the base model was loaded before the refusal"
    assert trainer.global_step == 0
    assert type(caught.value).__name__ == "MissingExportDependency"
    message = str(caught.value)
    assert "export format 'mlx' needs mlx-lm" in message and 'pip install -e ".[mlx]"' in message
    assert "\n" not in message


def test_an_unwritable_output_dir_stops_fit_before_the_model_loads(tiny_model_dir, tiny_data_dir, tmp_path):
    """Root writes through chmod, so the folder is made unwritable another way: its parent is a file."""
    import re

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    target = blocker / "exports"
    module, data = _module_and_data(tiny_model_dir, tiny_data_dir)
    trainer = _trainer(tmp_path, MergeExport(output_dir=str(target), formats=["native"], verify=False))
    with pytest.raises(OSError, match=re.escape(f"MergeExport output_dir '{target}' is not writable: ")):
        trainer.fit(module, datamodule=data)
    assert module.model is None and trainer.global_step == 0


@pytest.fixture(scope="module")
def saved_checkpoint(tiny_model_dir, tiny_data_dir, tmp_path_factory):
    """A checkpoint of a 2-step fit, in its run's checkpoints/ folder."""
    root = tmp_path_factory.mktemp("checkpointed_run")
    module, data = _module_and_data(tiny_model_dir, tiny_data_dir)
    trainer = _trainer(root, MergeExport(formats=["native"], verify=False))
    trainer.fit(module, datamodule=data)
    ckpt = root / "runs" / "m" / "version_0" / "checkpoints" / "adapter.ckpt"
    trainer.save_checkpoint(ckpt)
    return ckpt


def test_checkpoint_export_checks_formats_and_output_dir_before_loading_anything(saved_checkpoint, tmp_path,
                                                                                 monkeypatch, capsys):
    import sys

    import qblora_pl.export.exporter as exporter
    from qblora_pl.export.cli import main as export_main

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was rebuilt before the export's requirements were checked")

    monkeypatch.setattr(exporter, "module_from_checkpoint", no_loading)
    monkeypatch.setitem(sys.modules, "mlx_lm", None)
    with pytest.raises(SystemExit) as exited:
        export_main(["--ckpt_path", str(saved_checkpoint), "--formats", "native", "mlx",
                     "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "export format 'mlx' needs mlx-lm" in err and '".[mlx]"' in err
    assert "--no_verify" in err  # the writer needs no MLX: what to do instead of installing it

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit) as exited:
        export_main(["--ckpt_path", str(saved_checkpoint), "--output_dir", str(blocker / "out")])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and f"--output_dir '{blocker / 'out'}' is not writable: " in err
    assert not (tmp_path / "out").exists()


def test_sigterm_during_a_checkpoint_export_removes_its_staging_folder(saved_checkpoint, tmp_path, monkeypatch):
    """`timeout` / `kill` send SIGTERM, whose default action kills the process mid-write and leaves a
    hidden staging folder; main.py export turns it into an exit that cleans up on the way out."""
    import os
    import signal
    import time

    import qblora_pl.export.formats.native as native_format
    from qblora_pl.export.cli import main as export_main

    real_write_native = native_format.write_native

    def terminated_while_writing(*args, **kwargs):
        info = real_write_native(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler runs here
        return info

    def default_action(signum, frame):  # stands in for SIG_DFL, which would end pytest itself
        raise AssertionError("SIGTERM reached the default action: the export would die leaving its staging folder")

    monkeypatch.setattr(native_format, "write_native", terminated_while_writing)
    previous = signal.signal(signal.SIGTERM, default_action)
    try:
        with pytest.raises(SystemExit) as exited:
            export_main(["--ckpt_path", str(saved_checkpoint), "--formats", "native", "--no_verify",
                         "--output_dir", str(tmp_path / "out")])
        assert signal.getsignal(signal.SIGTERM) is default_action  # put back
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert exited.value.code == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []
