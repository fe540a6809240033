"""One training run for the FSDP tests, launched as a script so Lightning's launcher forks this
script (not pytest) into ranks: ``python tests/distributed/fsdp_worker.py SPEC.json``.

The spec names the model, data, method, world size and what to do (save, resume, export); every
rank writes ``rank{R}.json`` into ``spec["out_dir"]``: its per-step losses, the global adapter
gradient norm per step, the bytes of frozen base it holds, and whether its base is sharded.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

from qblora_pl.adapters import LoRA, QABLoRA, QALoRA, QBLoRA  # noqa: E402
from qblora_pl.data.datamodule import InstructionDataModule  # noqa: E402
from qblora_pl.distributed import FSDP2Strategy, base_weight_bytes, is_sharded  # noqa: E402
from qblora_pl.module import QuantizedCausalLM  # noqa: E402
from qblora_pl.quantization import NF4, GroupwiseInt  # noqa: E402

ADAPTERS = {
    "lora": lambda: LoRA(r=4, dropout=0.0),
    "qblora": lambda: QBLoRA(r=4, dropout=0.0),
    "qalora": lambda: QALoRA(r=4, dropout=0.0),
    "qablora": lambda: QABLoRA(budget_rank=4, dropout=0.0),
    "qablora_scales": lambda: QABLoRA(budget_rank=4, dropout=0.0, scale_rank=2),  # learned group scales
}
BACKENDS = {
    "int4": lambda: GroupwiseInt(bits=4, group_size=32),
    "nf4": lambda: NF4(),
    # The test model's 64 x 64 layers have 64 NF4 blocks: scaler blocks of 32 give 2 factors per
    # layer, which 2 ranks divide (torchao's default 256 would give 1: see test_fsdp_nf4_torchao).
    "nf4_torchao": lambda: NF4(implementation="torchao", scaler_block_size=32),
}


class Recorder(pl.Callback):
    """Per-step loss of this rank and the global L2 norm of the adapters' gradients."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.grad_norms: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        from torch.distributed.tensor import DTensor

        total = torch.zeros((), dtype=torch.float64)
        for p in pl_module.parameters():
            if p.requires_grad and p.grad is not None:
                g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
                total += g.double().pow(2).sum()
        if is_sharded(pl_module.model) and torch.distributed.is_initialized():
            torch.distributed.all_reduce(total)  # sum of the shards' squares
        self.grad_norms.append(float(total.sqrt()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


class SavedTensorProbe(pl.Callback):
    """What the first training step's forward saves for backward, looked at between the forward and
    the backward: the INT-b layers' packed codes (uint8) and whether FSDP2 freed their gathered
    storage after each layer's forward; and any float tensor of a quantized layer's weight shape."""

    def __init__(self) -> None:
        self.report: dict = {}
        self._context = None
        self._saved: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0:
            self._saved = []
            self._context = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
            self._context.__enter__()

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        self._saved.append(tensor)
        return tensor

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if self._context is None:
            return
        self._context.__exit__(None, None, None)
        self._context = None
        from qblora_pl.quantization.int_layer import GroupwiseIntLinear

        shapes = {m.weight_shape for m in pl_module.modules() if isinstance(m, GroupwiseIntLinear)}
        codes = [t for t in self._saved if t.dtype == torch.uint8]
        self.report = {
            "saved_codes": len(codes),
            "saved_codes_freed": sum(t.untyped_storage().size() == 0 for t in codes),
            "weight_shaped_float": [list(t.shape) for t in self._saved
                                    if t.is_floating_point() and tuple(t.shape) in shapes],
        }
        self._saved = []


def build(spec: dict) -> tuple[QuantizedCausalLM, InstructionDataModule, pl.Trainer, Recorder]:
    torch.set_num_threads(1)
    pl.seed_everything(spec.get("seed", 0))
    module = QuantizedCausalLM(
        spec["model_dir"],
        quantization=BACKENDS[spec.get("backend", "int4")](),
        adapter=ADAPTERS[spec.get("method", "qablora")](),
        learning_rate=spec.get("lr", 1e-2),
        warmup_steps=2,
        gradient_checkpointing=spec.get("gradient_checkpointing", False),
    )
    data = InstructionDataModule(spec["data_dir"], tokenizer_name_or_path=spec["model_dir"], batch_size=spec.get("batch_size", 8))
    recorder = Recorder()
    callbacks = [recorder, SavedTensorProbe()]
    if spec.get("export_dir"):
        from qblora_pl.callbacks.merge_export import MergeExport

        callbacks.append(MergeExport(output_dir=spec["export_dir"], formats=spec.get("export_formats", ["native"]), verify=True))
    devices = spec.get("devices", 2)
    strategy = FSDP2Strategy() if spec.get("strategy", "fsdp") == "fsdp" else "auto"
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        default_root_dir=spec["out_dir"],
        max_epochs=spec.get("max_epochs", 1),
        max_steps=spec.get("max_steps", -1),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        gradient_clip_val=spec.get("gradient_clip_val", 0.3),
        callbacks=callbacks,
    )
    return module, data, trainer, recorder


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    module, data, trainer, recorder = build(spec)
    trainer.fit(module, datamodule=data, ckpt_path=spec.get("resume"))
    if spec.get("save"):
        trainer.save_checkpoint(spec["save"])
    result = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "losses": recorder.losses,
        "grad_norms": recorder.grad_norms,
        "base_weight_bytes": base_weight_bytes(module.model),
        "sharded": is_sharded(module.model),
        "global_step": trainer.global_step,
        "saved_tensors": next(c for c in trainer.callbacks if isinstance(c, SavedTensorProbe)).report,
    }
    out = Path(spec["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
