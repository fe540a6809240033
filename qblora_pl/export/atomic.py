"""All-or-nothing writes: an export either appears complete under its final name or not at all.

Every exporter writes into a temporary sibling of its destination (same directory, so the final
``os.replace`` is a rename on one filesystem) and renames it into place only after the last
byte is written. On any exception the temporary path is removed and the exception propagates;
a previous export under the final name is left untouched until the new one is complete.

``tempfile`` creates its files 0600 and directories 0700 whatever the umask; the final names get
the modes a plain ``open`` / ``mkdir`` would have given them (0666 / 0777 less the umask), so an
export or cache written here is as readable as any other file the user writes.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_file(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; rename it to ``final`` if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    apply_umask(tmp_path)
    try:
        yield tmp_path
        _fsync(tmp_path)
        os.replace(tmp_path, final)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_directory(final: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary directory next to ``final``; swap it in if the block succeeds.

    ``os.replace`` cannot rename over a non-empty directory, so an existing ``final`` is first
    renamed aside, the new directory renamed in, and the old one deleted; if the second rename
    fails the old directory is put back.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temporary_directory(final)
    try:
        yield tmp
        for child in tmp.rglob("*"):
            if child.is_file():
                _fsync(child)
            # Some writers create restricted files whatever the umask (safetensors: 0600).
            apply_umask(child)
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
            os.replace(final, old / "previous")
            try:
                os.replace(tmp, final)
            except BaseException:
                os.replace(old / "previous", final)
                raise
            finally:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def current_umask() -> int:
    """The process umask (read by setting it and putting it back: there is no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike) -> None:
    """Give ``path`` the mode ``open`` / ``mkdir`` would have: 0666 or 0777 less the umask."""
    path = Path(path)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~current_umask())


def make_temporary_directory(final: str | os.PathLike, suffix: str = ".tmp") -> Path:
    """An empty directory next to ``final`` (same filesystem, hidden name), mode as ``mkdir`` gives."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=suffix, dir=final.parent))
    apply_umask(tmp)
    return tmp


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())
