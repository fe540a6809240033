"""``python main.py export --ckpt_path CKPT [--output_dir DIR] [--formats native gguf hf]``.

Merges a saved adapter checkpoint into its base and writes the low-bit model, outside of a
training run. The model, base and strategy are rebuilt from what the checkpoint recorded.

The export goes with its run: by default ``<run>/exports_x`` for ``<run>/checkpoints/x.ckpt``
(``x_export/`` beside any other checkpoint file), beside the fit's own ``<run>/exports``. It is staged and appears whole or not at all,
it never replaces the export of another checkpoint (``--overwrite`` to allow it), and it is
verified on held-out (validation) records of the data the checkpoint was trained on.

Before anything loads, every format's packages and the output folder are checked
(:mod:`qblora_pl.export.preflight`). SIGTERM (``timeout``, ``kill``, a scheduler) stops the export
like Ctrl-C, removing its staging folder, and exits with 143.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import threading

from qblora_pl.export.exporter import EXPORT_FORMATS, default_checkpoint_export_dir, export_from_checkpoint
from qblora_pl.export.formats import check_formats, registered_formats


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="main.py export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt_path", required=True, help="adapter checkpoint written by `main.py fit`")
    parser.add_argument("--model_name_or_path", default=None,
                        help="the base model, when not where the checkpoint recorded it (the same base: checked)")
    parser.add_argument("--output_dir", default=None,
                        help="default: <run>/exports_<name> for <run>/checkpoints/<name>.ckpt, else <name>_export beside it")
    parser.add_argument("--formats", nargs="+", default=list(EXPORT_FORMATS),
                        help=f"any of {' '.join(registered_formats())}, or the import path of an ExportFormat class "
                             "(docs/extending.md). Default: native gguf hf; mlx's verification needs mlx-lm "
                             "(pip install -e '.[mlx]'), compressed-tensors' (vLLM / SGLang) compressed-tensors "
                             "(pip install -e '.[vllm]')")
    parser.add_argument("--round_zero_points", action="store_true",
                        help="compressed-tensors: round merged offsets to integer zero points (lossy, measured)")
    parser.add_argument("--overwrite", action="store_true", help="replace an export of another checkpoint in output_dir")
    parser.add_argument("--no_verify", action="store_true", help="skip reloading each export to compare its logits")
    parser.add_argument("--data_path", default=None,
                        help="the run's data, when not where the checkpoint recorded it (verification records)")
    parser.add_argument("--verify_records", type=int, default=8, help="held-out records to verify on (default 8)")
    args = parser.parse_args(argv)
    if args.verify_records < 1:
        parser.error(f"--verify_records {args.verify_records}: must be >= 1")
    from qblora_pl.errors import exit_on_error
    from qblora_pl.export.exporter import ExportVerificationError
    from qblora_pl.export.preflight import check_export_requirements, check_writable_destination

    output_dir = args.output_dir or default_checkpoint_export_dir(args.ckpt_path)
    try:
        args.formats = check_formats(args.formats)
        check_export_requirements(args.formats, verify=not args.no_verify)
        check_writable_destination(output_dir, "--output_dir" if args.output_dir else "the default --output_dir")
        with _sigterm_stops_the_export():
            report = export_from_checkpoint(
                None, args.ckpt_path, output_dir, formats=args.formats, verify=not args.no_verify,
                model_name_or_path=args.model_name_or_path, overwrite=args.overwrite, data_path=args.data_path,
                verify_records=args.verify_records, round_zero_points=args.round_zero_points,
            )
    except (ExportVerificationError, FloatingPointError) as err:  # the checkpoint's adapters or the export failed
        parser.exit(2, f"main.py export: error: {err}\n")
    except Exception as err:  # user errors: one line, exit 2 (qblora_pl.errors); defects keep their traceback
        exit_on_error("main.py export", err)
        raise
    print(json.dumps(report, indent=2, default=str))
    return report


@contextlib.contextmanager
def _sigterm_stops_the_export():
    """SIGTERM raises SystemExit(143) instead of killing the process where it stands.

    The default action ends the process mid-write, leaving the hidden staging folder behind; as an
    exception it unwinds like Ctrl-C: the staging folder is removed, the model unmerged, and a
    previous export stays as it was. Signal handlers can only be set in the main thread.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        print(f"main.py export: stopped by signal {signum}; removing the partial export (a previous one is kept)",
              file=sys.stderr, flush=True)
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
