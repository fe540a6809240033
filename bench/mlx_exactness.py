"""How exactly mlx-lm runs our MLX export: QA-BLoRA at INT2/3/4 x g32/64/128 against our loader.

    python bench/mlx_exactness.py                                   # embedded model, ~2 min on 1 core
    python bench/mlx_exactness.py --model "$(python scripts/fetch_smollm2.py --quiet)" --bits 4 --group-sizes 32

For every (bits, group size): build configs/qablora.yaml's method (QA-BLoRA, budget rank 8,
alpha 16) on a GroupwiseInt base, set the adapters to random non-zero values (``--std``), merge,
write the native export and the MLX export (``--scale-dtypes``: float32 keeps scales and biases
exactly, float16 is mlx-lm's usual storage) from the same snapshot, load the first with
``qblora_pl.export.load_native`` and the second with ``mlx_lm.load``, and report on the four
``SAMPLE_TEXTS`` of ``qblora_pl/export/verify.py``:

* bits per weight of the quantized layers (codes + scales + biases) and the file size;
* max |logit difference| mlx-lm vs load_native (absolute and relative to the logit std) - the
  same weights in two runtimes, so this includes MLX's vs torch's float32 kernels;
* max |logit difference| within MLX: the export against a dense float32 MLX export of the same
  merged weights (relative to the logit std) - what the quantized storage itself changes;
* greedy-token agreement: ``--new-tokens`` greedy tokens per prompt from each (mlx-lm's
  ``generate_step`` with its KV cache; ours by full recomputation), the share of tokens before
  the first disagreement.

Needs ``pip install -e ".[mlx]"``. Prints a markdown table and writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def qablora_module(model: str, bits: int, group_size: int, std: float, seed: int):
    from qblora_pl.adapters import QABLoRA
    from qblora_pl.module import QuantizedCausalLM
    from qblora_pl.quantization import GroupwiseInt

    module = QuantizedCausalLM(model, quantization=GroupwiseInt(bits=bits, group_size=group_size),
                               adapter=QABLoRA(budget_rank=8, alpha=16, dropout=0.0), target_modules=TARGETS)
    module.configure_model()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(module.named_parameters()):
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    return module


@torch.no_grad()
def torch_greedy(model, ids: list[int], n: int) -> list[int]:
    tokens, out = torch.tensor([ids]), []
    for _ in range(n):
        nxt = int(model(input_ids=tokens).logits[0, -1].argmax())
        out.append(nxt)
        tokens = torch.cat([tokens, torch.tensor([[nxt]])], dim=1)
    return out


def agreed_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@torch.no_grad()
def measure(native, client, dense_client, prompts_ids: list[list[int]], new_tokens: int) -> dict:
    worst_abs, worst_rel, within, agreed, total = 0.0, 0.0, 0.0, 0, 0
    for ids in prompts_ids:
        ours = native(input_ids=torch.tensor([ids])).logits[0].float()
        theirs = client(input_ids=torch.tensor([ids])).logits[0]
        dense = dense_client(input_ids=torch.tensor([ids])).logits[0]
        diff = float((ours - theirs).abs().max())
        worst_abs, worst_rel = max(worst_abs, diff), max(worst_rel, diff / float(ours.std()))
        within = max(within, float((dense - theirs).abs().max() / dense.std()))
        agreed += agreed_prefix(torch_greedy(native, ids, new_tokens), client.greedy_tokens(ids, new_tokens))
        total += new_tokens
    return {"max_abs_logit_diff": worst_abs, "max_logit_diff_over_std": worst_rel,
            "mlx_vs_mlx_dense_over_std": within, "greedy_agreement": agreed / total, "greedy_tokens": total}


def dense_mlx_export(snapshot, path: Path, tokenizer_source) -> None:
    """The same merged weights as a dense float32 MLX export (every layer dense, same writer)."""
    import copy

    from qblora_pl.export.mlx_writer import write_mlx
    from qblora_pl.export.snapshot import FROZEN_DENSE

    dense = copy.copy(snapshot)
    dense.linears = {name: copy.copy(linear) for name, linear in snapshot.linears.items()}
    for linear in dense.linears.values():
        linear.weight, linear.quantized, linear.origin = linear.dense_weight(), None, FROZEN_DENSE
    write_mlx(dense, path, tokenizer_source)


def main() -> None:
    from qblora_pl.paths import EMBEDDED_MODEL_DIR

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(EMBEDDED_MODEL_DIR), help="HF directory, hub name or .gguf file")
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--group-sizes", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--scale-dtypes", nargs="+", default=["float32", "float16"])
    parser.add_argument("--std", type=float, default=0.1, help="std of the random adapter values")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default="bench/results/mlx_exactness.json")
    args = parser.parse_args()
    torch.set_num_threads(1)

    import mlx_lm

    from qblora_pl.export.mlx_loader import load_mlx
    from qblora_pl.export.mlx_writer import write_mlx
    from qblora_pl.export.native import write_native
    from qblora_pl.quantization.native_checkpoint import load_native
    from qblora_pl.export.snapshot import snapshot_merged_model
    from qblora_pl.export.verify import SAMPLE_TEXTS
    from qblora_pl.merging import merged
    from qblora_pl.sources import load_tokenizer, pretrained_name_or_path

    tokenizer_source = pretrained_name_or_path(args.model)
    tokenizer = load_tokenizer(str(args.model))
    prompts_ids = [list(tokenizer.encode(text)) for text in SAMPLE_TEXTS]
    rows = []
    for bits in args.bits:
        for group_size in args.group_sizes:
            started = time.perf_counter()
            module = qablora_module(args.model, bits, group_size, args.std, args.seed)
            with tempfile.TemporaryDirectory() as tmp, merged(module.model):
                snapshot = snapshot_merged_model(module.model)
                write_native(snapshot, Path(tmp) / "native", tokenizer_source)
                native = load_native(Path(tmp) / "native")
                dense_mlx_export(snapshot, Path(tmp) / "mlx-dense", tokenizer_source)
                dense_client = load_mlx(Path(tmp) / "mlx-dense")
                for scale_dtype in args.scale_dtypes:
                    info = write_mlx(snapshot, Path(tmp) / f"mlx-{scale_dtype}", tokenizer_source, scale_dtype=scale_dtype)
                    client = load_mlx(info["path"])
                    if [list(client.tokenizer.encode(t)) for t in SAMPLE_TEXTS] != prompts_ids:
                        raise RuntimeError("mlx-lm tokenizes the prompts differently from the source tokenizer")
                    row = {"bits": bits, "group_size": group_size, "scale_dtype": scale_dtype,
                           "bits_per_weight": info["bits_per_quantized_weight"], "file_bytes": info["bytes"],
                           "max_abs_bias_rounding": info["max_abs_bias_rounding"],
                           **measure(native, client, dense_client, prompts_ids, args.new_tokens)}
                    rows.append(row)
                    print(f"INT{bits} g{group_size} {scale_dtype}: {row['bits_per_weight']:.3f} bits/weight, "
                          f"max |dlogit| {row['max_abs_logit_diff']:.3g} ({row['max_logit_diff_over_std']:.3g} std), "
                          f"vs dense MLX {row['mlx_vs_mlx_dense_over_std']:.3g} std, "
                          f"greedy {row['greedy_agreement']:.3f} [{time.perf_counter() - started:.0f}s]", flush=True)
                    del client
                del dense_client

    print(f"\nmlx-lm {mlx_lm.__version__} vs load_native, {args.model}, {len(prompts_ids)} prompts "
          f"({sum(map(len, prompts_ids))} tokens), {args.new_tokens} greedy tokens each\n")
    print("| base | scales/biases | bits per weight | bytes per weight | file MB | mlx-lm vs load_native: max abs logit diff | / logit std | vs dense MLX export / logit std | greedy agreement |")
    print("|------|---------------|-----------------|------------------|---------|------------------------------------------|-------------|---------------------------------|------------------|")
    for r in rows:
        print(f"| INT{r['bits']} g{r['group_size']} | {r['scale_dtype']} | {r['bits_per_weight']:.3f} | "
              f"{r['bits_per_weight'] / 8:.4f} | {r['file_bytes'] / 1e6:.2f} | {r['max_abs_logit_diff']:.3g} | "
              f"{r['max_logit_diff_over_std']:.3g} | {r['mlx_vs_mlx_dense_over_std']:.3g} | {r['greedy_agreement']:.3f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "mlx_lm": mlx_lm.__version__, "std": args.std,
                               "new_tokens": args.new_tokens, "rows": rows}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
