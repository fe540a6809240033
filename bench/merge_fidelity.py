"""How exactly each method's trained adapter merges into a deployable model.

    python bench/merge_fidelity.py                     # embedded model + data, 60 steps each
    python bench/merge_fidelity.py --steps 200 --bits 4 3 2

For every method: fine-tune for ``--steps`` on the same data (Lightning, same LR and batch),
then on the validation split report

* the response loss of the trained (unmerged) model,
* the merged model's max |logit difference| to it and its loss - QA-LoRA / QA-BLoRA merge
  into the INT-b offsets (every weight stays b-bit), LoRA / Q-BLoRA into a dense fp32 copy,
* for LoRA / Q-BLoRA, the loss after re-quantizing the merged weights to INT-b (RTN, group
  ``--group-size``): the lossy deployment path QA-* avoids.

Prints a table and writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_methods(rank: int, bits: int, group_size: int) -> dict:
    """The four methods of configs/<method>.yaml at budget rank ``rank``, dropout 0 (bench/accuracy_lib/methods.py)."""
    from bench.accuracy_lib.methods import build

    return {method: build(method, rank, bits, group_size) for method in ("qlora", "qblora", "qalora", "qablora")}


@torch.no_grad()
def evaluate(model, batches) -> tuple[float, list[torch.Tensor]]:
    """Token-weighted response loss over ``batches`` and the logits of each batch."""
    model.eval()
    total, count, logits = 0.0, 0, []
    for batch in batches:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        shift_logits, shift_labels = out.logits[:, :-1].float(), batch["labels"][:, 1:]
        mask = shift_labels != -100
        loss = torch.nn.functional.cross_entropy(shift_logits[mask], shift_labels[mask], reduction="sum")
        total, count = total + float(loss), count + int(mask.sum())
        logits.append(out.logits.float())
    return total / max(count, 1), logits


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor], batches) -> float:
    return max(float(((x - y).abs().amax(-1) * bt["attention_mask"]).max()) for x, y, bt in zip(a, b, batches))


def main() -> None:
    import lightning.pytorch as pl

    from qblora_pl.data.datamodule import InstructionDataModule
    from qblora_pl.merging import merge_adapters, requantize_merged, unmerge_adapters
    from qblora_pl.module import QuantizedCausalLM
    from qblora_pl.paths import EMBEDDED_DATA_DIR, EMBEDDED_MODEL_DIR

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(EMBEDDED_MODEL_DIR))
    parser.add_argument("--data", default=str(EMBEDDED_DATA_DIR / "instructions"))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2], help="first = QA-* base bits; all = re-quantization widths")
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--val-batches", type=int, default=8)
    parser.add_argument("--methods", nargs="+", default=["qlora", "qblora", "qalora", "qablora"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/results/merge_fidelity.json")
    args = parser.parse_args()
    if args.model:  # a .gguf file: its converted HF directory (qblora_pl.sources)
        from qblora_pl.sources import pretrained_name_or_path

        args.model = pretrained_name_or_path(args.model)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    results = {}
    for name in args.methods:
        pl.seed_everything(args.seed)
        quantization, adapter = build_methods(args.rank, args.bits[0], args.group_size)[name]
        module = QuantizedCausalLM(args.model, quantization=quantization, adapter=adapter, learning_rate=args.lr, warmup_steps=5)
        data = InstructionDataModule(args.data, tokenizer_name_or_path=args.model, batch_size=args.batch_size)
        trainer = pl.Trainer(
            accelerator="auto", devices=1, max_steps=args.steps, logger=False, enable_checkpointing=False,
            limit_val_batches=0, enable_model_summary=False, gradient_clip_val=0.3,
        )
        trainer.fit(module, datamodule=data)
        model = module.model
        batches = [b for _, b in zip(range(args.val_batches), data.val_dataloader())]
        batches = [{k: v.to(module.device) for k, v in b.items()} for b in batches]

        trained_loss, trained_logits = evaluate(model, batches)
        how = merge_adapters(model)
        merged_loss, merged_logits = evaluate(model, batches)
        row = {
            "trainable_params": sum(p.numel() for p in module.parameters() if p.requires_grad),
            "trained_loss": trained_loss,
            "merge": sorted(set(how.values())),
            "merged_loss": merged_loss,
            "merged_max_abs_logit_diff": max_diff(trained_logits, merged_logits, batches),
            "requantized": {},
        }
        if "dense" in how.values():
            for bits in args.bits:
                unmerge_adapters(model)
                merge_adapters(model)
                errors = requantize_merged(model, bits=bits, group_size=args.group_size)
                loss, logits = evaluate(model, batches)
                row["requantized"][f"int{bits}_g{args.group_size}"] = {
                    "loss": loss,
                    "max_abs_logit_diff": max_diff(trained_logits, logits, batches),
                    "mean_relative_weight_error": sum(errors.values()) / len(errors),
                }
        unmerge_adapters(model)
        results[name] = row
        del module, model, trainer

    print(f"\nmodel={args.model} steps={args.steps} rank={args.rank} QA base INT{args.bits[0]} g{args.group_size} lr={args.lr}")
    print(f"{'method':<8} {'params':>8} {'trained':>8} {'merged':>8} {'max|dlogit|':>12} {'merge':>8}  re-quantized merged model (loss)")
    for name, r in results.items():
        req = "  ".join(f"{k}: {v['loss']:.4f}" for k, v in r["requantized"].items()) or "(exact low-bit merge)"
        print(
            f"{name:<8} {r['trainable_params']:>8,} {r['trained_loss']:>8.4f} {r['merged_loss']:>8.4f} "
            f"{r['merged_max_abs_logit_diff']:>12.2e} {','.join(r['merge']):>8}  {req}"
        )
    print("losses are per-token response cross-entropy on the validation split; ppl = exp(loss)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
