"""``python main.py export --ckpt_path CKPT [--output_dir DIR] [--formats native gguf hf]``.

Merges a saved adapter checkpoint into its base and writes the low-bit model, outside of a
training run. The model, base and strategy are rebuilt from what the checkpoint recorded.
"""

from __future__ import annotations

import argparse
import json

from qblora_pl.export.exporter import EXPORT_FORMATS, export_from_checkpoint


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="main.py export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt_path", required=True, help="adapter checkpoint written by `main.py fit`")
    parser.add_argument("--model_name_or_path", default=None,
                        help="the base model, when not where the checkpoint recorded it (the same base: checked)")
    parser.add_argument("--output_dir", default="exports")
    parser.add_argument("--formats", nargs="+", default=list(EXPORT_FORMATS), choices=list(EXPORT_FORMATS))
    parser.add_argument("--no_verify", action="store_true", help="skip reloading each export to compare its logits")
    args = parser.parse_args(argv)
    from qblora_pl.checkpoints import UnreadableCheckpoint
    from qblora_pl.sources import SourceError

    try:
        report = export_from_checkpoint(None, args.ckpt_path, args.output_dir, formats=args.formats,
                                        verify=not args.no_verify, model_name_or_path=args.model_name_or_path)
    except (UnreadableCheckpoint, SourceError) as err:
        parser.exit(2, f"main.py export: error: {err}\n")
    print(json.dumps(report, indent=2, default=str))
    return report
