"""One INT4 layer at decode shape (batch 1): where the native model's decode time goes.

    OMP_NUM_THREADS=1 python bench/int4_matmul.py                  # 1024 -> 2816, g32
    python bench/int4_matmul.py --d-in 4096 --d-out 11008 --group-size 128

Times, for the same random weight quantized to INT4 (``GroupwiseIntLinear.from_linear``):
the dense fp32 and bf16 matmul of the dequantized weight, ``GroupwiseIntLinear.forward`` (what
the native export runs by default: unpack + dequantize the whole weight, then a dense matmul;
its ``dequantize`` and ``codes`` parts timed alone), the same layer with
``use_int4_kernel(True)`` (the opt-in fast path: cached int4pack weight, bf16 compute), and
torch's CPU INT4 kernel ``aten._weight_int4pack_mm_for_cpu`` on the same codes and groups
(``w = (q - 8) * scale + zero`` with ``zero = offset + 8 * scale``; bf16 activations, scales and
zeros, so it is not bit-exact). Process CPU time per call, least of ``--rounds`` interleaved
rounds of ``--calls`` calls. CPU only.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    from qblora_pl.quantization.int_layer import GroupwiseIntLinear

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-in", type=int, default=1024)
    parser.add_argument("--d-out", type=int, default=2816)
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    layer = GroupwiseIntLinear.from_linear(torch.nn.Linear(args.d_in, args.d_out, bias=False), bits=4, group_size=args.group_size)
    weight = layer.dequantize(torch.float32)
    x = torch.randn(1, args.d_in)
    cases = {
        "dense fp32 F.linear": lambda: torch.nn.functional.linear(x, weight),
        "dense bf16 F.linear": (lambda w=weight.bfloat16(), xb=x.bfloat16(): torch.nn.functional.linear(xb, w)),
        "GroupwiseIntLinear.forward": lambda: layer(x),
        "  of which dequantize()": lambda: layer.dequantize(torch.float32),
        "  of which codes() (unpack)": lambda: layer.codes(),
    }
    if layer.int4_kernel_unsupported_reason() is None:
        fast = copy.deepcopy(layer).use_int4_kernel(True)
        cases["GroupwiseIntLinear int4 kernel"] = lambda: fast(x)
        with torch.inference_mode():
            fast_error = float((fast(x) - x @ weight.T).norm() / (x @ weight.T).norm())
    kernel = getattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", None)
    if kernel is not None:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(layer.codes().to(torch.int32), 1)
        scales, offsets = layer.scales.float(), layer.offsets.float()
        scales_zeros = torch.stack([scales, offsets + 8 * scales], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
        cases["aten._weight_int4pack_mm_for_cpu"] = lambda: kernel(x.to(torch.bfloat16), packed, args.group_size, scales_zeros)
        reference = x @ weight.T
        error = float((cases["aten._weight_int4pack_mm_for_cpu"]().float() - reference).abs().max() / reference.abs().max())
    best = {name: float("inf") for name in cases}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for name, call in cases.items():
                start = time.process_time()
                for _ in range(args.calls):
                    call()
                best[name] = min(best[name], (time.process_time() - start) / args.calls)
    print(f"INT4 g{args.group_size} layer {args.d_in} -> {args.d_out}, batch 1, {args.threads} thread(s), torch {torch.__version__}")
    for name, seconds in best.items():
        print(f"{name:<34} {seconds * 1e6:>10.1f} us/call   {best['dense fp32 F.linear'] / seconds:>6.2f}x fp32")
    if kernel is not None:
        print(f"int4pack kernel max |error| / max |y| vs the dequantized weight: {error:.2e} (bf16 activations)")
    if "GroupwiseIntLinear int4 kernel" in cases:
        print(f"use_int4_kernel(True) layer: ||y - y_exact|| / ||y_exact|| = {fast_error:.2e}")


if __name__ == "__main__":
    main()
