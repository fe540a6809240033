"""The MergeExport callback at the end of fit, and the same export from a saved checkpoint."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import torch

from callbacks.merge_export import MergeExport
from qblora_pl.adapters import QABLoRA
from qblora_pl.data.instruction import InstructionDataModule
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
