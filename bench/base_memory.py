"""Bytes per weight of the group-wise INT-b base on a real model, vs the formula.

    python bench/base_memory.py                       # the embedded model
    python bench/base_memory.py --model path/or/hub-name --bits 4 --group-sizes 32 128

Quantizes every linear layer but the output head and reports, over those layers, the bytes
actually held (bit-packed codes + fp16 scales + fp16 offsets) per weight next to the
formula ``(b + 2 * 16 / g) / 8``, and the whole model's size against its fp16 size.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    from qblora_pl.paths import EMBEDDED_MODEL_DIR
    from qblora_pl.quantization import GroupwiseInt
    from qblora_pl.quantization.int_layer import GroupwiseIntLinear

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(EMBEDDED_MODEL_DIR))
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 8])
    parser.add_argument("--group-sizes", type=int, nargs="+", default=[32, 64, 128])
    args = parser.parse_args()
    if args.model:  # a .gguf file: its converted HF directory (qblora_pl.sources)
        from qblora_pl.sources import pretrained_name_or_path

        args.model = pretrained_name_or_path(args.model)

    print(f"model={args.model}")
    print(f"{'bits':>4} {'group':>5} {'layers':>6} {'weights':>10} {'bytes':>10} {'B/weight':>9} {'formula':>8} {'model MiB':>10} {'fp16 MiB':>9}")
    for bits in args.bits:
        for group in args.group_sizes:
            model = GroupwiseInt(bits=bits, group_size=group, compute_dtype="float32").load(args.model)
            layers = [m for m in model.modules() if isinstance(m, GroupwiseIntLinear)]
            weights = sum(m.in_features * m.out_features for m in layers)
            held = sum(m.memory_bytes() - (m.bias.numel() * 4 if m.bias is not None else 0) for m in layers)
            others = sum(p.numel() for p in model.parameters()) * 2  # non-quantized tensors at fp16
            print(
                f"{bits:>4} {group:>5} {len(layers):>6} {weights:>10,} {held:>10,} {held / weights:>9.4f} "
                f"{(bits + 32 / group) / 8:>8.4f} {(held + others) / 2**20:>10.2f} {(weights * 2 + others) / 2**20:>9.2f}"
            )


if __name__ == "__main__":
    main()
