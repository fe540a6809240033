"""Per-rank memory of the frozen quantized base under FSDP2, 1 vs N ranks (CPU, gloo).

    OMP_NUM_THREADS=1 python bench/fsdp_memory.py                 # embedded model, INT4 g32, 1 and 2 ranks
    OMP_NUM_THREADS=1 python bench/fsdp_memory.py --ranks 1 2 4 --model PATH
    OMP_NUM_THREADS=1 python bench/fsdp_memory.py --base nf4-torchao   # Q-BLoRA on torchao NF4

Each world size runs Lightning (``FSDP2Strategy``, ``accelerator=cpu``) for one training step -
QA-BLoRA on the INT4 g32 base, or Q-BLoRA on an NF4 base stored as torchao's NF4Tensor
(``--base nf4-torchao``) - and reports, per rank, the bytes of the local shards of the frozen
parameters (packed INT4 codes, fp16 scales and offsets - or NF4 codes, int8 block scales and
their factors - embeddings, norms, head) and of the trainable adapters, measured after the step.
Prints one table; ``--json`` also writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def child(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(REPO))
    import lightning.pytorch as pl
    import torch
    from torch.distributed.tensor import DTensor

    from qblora_pl.adapters import QABLoRA, QBLoRA
    from qblora_pl.data.datamodule import InstructionDataModule
    from qblora_pl.distributed import FSDP2Strategy, base_weight_bytes, is_sharded
    from qblora_pl.module import QuantizedCausalLM
    from qblora_pl.paths import EMBEDDED_MODEL_DIR
    from qblora_pl.quantization import NF4, GroupwiseInt

    torch.set_num_threads(1)
    model_dir = args.model or str(EMBEDDED_MODEL_DIR)

    class Measure(pl.Callback):
        def on_train_end(self, trainer, pl_module):
            adapters = sum(
                (p.to_local() if isinstance(p, DTensor) else p).numel() * p.element_size()
                for p in pl_module.parameters() if p.requires_grad
            )
            row = {"world_size": trainer.world_size, "rank": trainer.global_rank, "sharded": is_sharded(pl_module.model),
                   "base_bytes": base_weight_bytes(pl_module.model), "adapter_bytes": adapters}
            Path(args.out, f"w{trainer.world_size}_r{trainer.global_rank}.json").write_text(json.dumps(row))

    pl.seed_everything(0)
    if args.base == "nf4-torchao":
        quantization, adapter = NF4(implementation="torchao", scaler_block_size=args.scaler_block_size), QBLoRA(r=8)
    else:
        quantization, adapter = GroupwiseInt(bits=4, group_size=32), QABLoRA(budget_rank=8)
    module = QuantizedCausalLM(model_dir, quantization=quantization, adapter=adapter)
    data = InstructionDataModule(args.data, tokenizer_name_or_path=model_dir, batch_size=2 * args.world, max_source_length=64, max_target_length=16) \
        if args.data else InstructionDataModule(tokenizer_name_or_path=model_dir, batch_size=2 * args.world, max_source_length=64, max_target_length=16)
    trainer = pl.Trainer(accelerator="cpu", devices=args.world, strategy=FSDP2Strategy(), max_steps=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0, callbacks=[Measure()])
    trainer.fit(module, datamodule=data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--model", default=None, help="HF model directory (default: the embedded model)")
    parser.add_argument("--data", default=None, help="data path (default: the embedded instruction set)")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument("--base", choices=["int4", "nf4-torchao"], default="int4",
                        help="INT4 g32 with QA-BLoRA, or NF4 on torchao's NF4Tensor with Q-BLoRA")
    parser.add_argument("--scaler-block-size", type=int, default=256, help="nf4-torchao: blocks per double-quantization factor")
    parser.add_argument("--world", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model:  # a .gguf file: its converted HF directory (qblora_pl.sources)
        from qblora_pl.sources import pretrained_name_or_path

        args.model = pretrained_name_or_path(args.model)
    if args.world:
        child(args)
        return
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for world in args.ranks:
            cmd = [sys.executable, __file__, "--world", str(world), "--out", out, "--base", args.base,
                   "--scaler-block-size", str(args.scaler_block_size)]
            cmd += ["--model", args.model] if args.model else []
            cmd += ["--data", args.data] if args.data else []
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
            subprocess.run(cmd, check=True, env=env, cwd=out, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            rows += [json.loads(Path(out, f"w{world}_r{r}.json").read_text()) for r in range(world)]
    one = next(r["base_bytes"] for r in rows if r["world_size"] == min(args.ranks))
    print(f"base: {args.base}")
    print(f"{'world':>5} {'rank':>4} {'sharded':>7} {'base bytes/rank':>16} {'x of ' + str(min(args.ranks)) + ' rank':>10} {'adapter bytes/rank':>19}")
    for r in rows:
        print(f"{r['world_size']:>5} {r['rank']:>4} {str(r['sharded']):>7} {r['base_bytes']:>16,} {r['base_bytes'] / one:>10.3f} {r['adapter_bytes']:>19,}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
