"""Is an export's GGUF-vs-native logit gap exactly the fp16 rounding of the merged offsets?

    python bench/gguf_offset_rounding.py runs/qablora/version_0/exports

A QA-LoRA / QA-BLoRA merge leaves float32 group offsets (docs/method.md 3-4); the native export keeps
them, GGUF's Q4_1 stores each block's minimum ``m`` as fp16. This evaluates, on the export's
sample texts (``export.verify.text_batch``): the native model, the native model with every
offset rounded to fp16, and the GGUF file through transformers' reader (float32 evaluation of
the file's weights). If the last two agree to 0.0, the whole gap is the format's fp16 offset.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qblora_pl.quantization.native_checkpoint import load_native  # noqa: E402
from qblora_pl.export.verify import compare_logits, load_gguf_with_reader, logits_and_perplexity, text_batch  # noqa: E402
from qblora_pl.quantization.int_layer import GroupwiseIntLinear  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export_dir", help="an export directory holding native/ and model.gguf")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    export = Path(args.export_dir)
    native = load_native(export / "native").eval()
    batch = text_batch(export / "native")
    reference, ppl = logits_and_perplexity(native, batch)

    rounded = copy.deepcopy(native)
    layers = [m for m in rounded.modules() if isinstance(m, GroupwiseIntLinear)]
    for layer in layers:
        layer.offsets = layer.offsets.to(torch.float16).float()
    rounded_logits, rounded_ppl = logits_and_perplexity(rounded, batch)
    gguf_logits, gguf_ppl = logits_and_perplexity(load_gguf_with_reader(export / "model.gguf").eval(), batch)

    result = {
        "export": str(export),
        "int_layers": len(layers),
        "reference_logit_std": float(reference.std()),
        "ppl": {"native": ppl, "native_fp16_offsets": rounded_ppl, "gguf": gguf_ppl},
        "native_vs_fp16_offsets": compare_logits(reference, rounded_logits, batch),
        "native_vs_gguf": compare_logits(reference, gguf_logits, batch),
        "fp16_offsets_vs_gguf": compare_logits(rounded_logits, gguf_logits, batch),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
