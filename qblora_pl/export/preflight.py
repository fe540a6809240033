"""Checks that an export can be written, made before the costly work: training, loading the model.

A run learns at its end, after hours of training, that ``formats: [..., mlx]`` cannot be verified
without mlx-lm or that ``output_dir`` cannot be written; these checks say so when ``fit`` starts
(:class:`qblora_pl.callbacks.MergeExport` ``setup``, before ``configure_model`` loads the model)
and when ``main.py export`` starts, each in one line naming the option, the value and the fix.
"""

from __future__ import annotations

import importlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from qblora_pl.export.formats import export_format  # each format lists the packages it needs


class MissingExportDependency(ImportError):
    """A requested export format needs a package that is not installed (or does not import)."""


class ExportDestinationNotWritable(PermissionError):
    """The export's ``output_dir`` cannot be created or written (a read-only folder, a file in its path)."""


def check_export_requirements(formats: Sequence[str], verify: bool = True) -> None:
    """Raise :class:`MissingExportDependency` naming every format whose packages do not import.

    Imports them rather than looking them up: an installed package that fails to import (MLX
    without its CPU backend on Linux) fails the export just the same.
    """
    missing, verify_only = [], True
    for fmt in formats:
        for need in export_format(fmt).requirements:
            if need.verify_only and not verify:
                continue
            problem = _import_problem(need.module)
            if problem is not None:
                purpose = "verify" if need.verify_only else "write"
                missing.append(f"export format {fmt!r} needs {need.distribution} to {purpose} the export "
                               f"(import {need.module} failed: {problem}); install it with {need.install}")
                verify_only = verify_only and need.verify_only
    if not missing:
        return
    instead = ("skip the verification (MergeExport verify: false / main.py export --no_verify) or " if verify_only
               else "")
    raise MissingExportDependency("; ".join(missing) + f"; or {instead}drop the format from formats")


def _import_problem(module: str) -> str | None:
    """Why ``module`` does not import (``ExcType: message``), or None when it does."""
    try:
        importlib.import_module(module)
    except Exception as err:  # noqa: BLE001 - a broken install (missing shared library) counts as missing
        return f"{type(err).__name__}: {err}"
    return None


def check_writable_destination(output_dir: str | os.PathLike, option: str = "output_dir") -> None:
    """Raise :class:`ExportDestinationNotWritable` when an export could not be written to ``output_dir``.

    The export is staged in a hidden sibling and renamed into place, so what must take writes is
    the parent folder - or, when it does not exist yet, its nearest existing ancestor, where the
    missing folders will be made - and an existing ``output_dir`` (renamed aside by the swap).
    Found by writing there (an unnamed file, removed at once), not by ``os.access``: root passes
    that everywhere, and a read-only mount keeps its permission bits. ``option`` names the setting
    in the message (``MergeExport output_dir``, ``--output_dir``).
    """
    output_dir = Path(output_dir).expanduser()
    anchor = output_dir.parent
    while not os.path.lexists(anchor) and anchor != anchor.parent:
        anchor = anchor.parent
    folders = [anchor] + ([output_dir] if os.path.lexists(output_dir) else [])
    for folder in folders:
        if not folder.is_dir():
            raise ExportDestinationNotWritable(
                f"{option} {str(output_dir)!r} is not writable: {str(folder)!r} is not a folder; name another folder"
            )
        try:
            with tempfile.TemporaryFile(dir=str(folder)):
                pass
        except OSError as err:
            raise ExportDestinationNotWritable(
                f"{option} {str(output_dir)!r} is not writable: cannot create a file in {str(folder)!r} "
                f"({err.strerror or err}); name a folder you can write to"
            ) from err
