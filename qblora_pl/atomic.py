"""All-or-nothing writes: an export either appears complete under its final name or not at all.

Every exporter writes into a temporary sibling of its destination (same directory, so the final
``os.replace`` is a rename on one filesystem) and renames it into place only after the last
byte is written. On any exception the temporary path is removed and the exception propagates;
a previous export under the final name is left untouched until the new one is complete.

``tempfile`` creates its files 0600 and directories 0700 whatever the umask; the final names get
the modes a plain ``open`` / ``mkdir`` would have given them (0666 / 0777 less the umask), so an
export or cache written here is as readable as any other file the user writes.

A process killed mid-write (SIGKILL, power loss) cannot clean up, so the temporary names say who
owns them: ``.<name>.<host>-<pid>-<random>.tmp`` (and ``.old`` for a directory set aside during the
swap). The next write to the same ``final`` removes such siblings whose process is gone
(:func:`remove_stale_siblings`); a live writer's, another host's and any other name are left alone.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_file(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; rename it to ``final`` if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(final)
    fd, tmp = tempfile.mkstemp(prefix=_owned_prefix(final), suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        apply_umask(tmp_path)
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
    remove_stale_siblings(final)
    tmp = make_temporary_directory(final)
    try:
        yield tmp
        for child in tmp.rglob("*"):
            if child.is_file():
                _fsync(child)
            # Some writers create restricted files whatever the umask (safetensors: 0600).
            apply_umask(child)
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=_owned_prefix(final), suffix=".old", dir=final.parent))
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
    tmp = Path(tempfile.mkdtemp(prefix=_owned_prefix(final), suffix=suffix, dir=final.parent))
    try:
        apply_umask(tmp)
    except BaseException:
        tmp.rmdir()
        raise
    return tmp


def remove_stale_siblings(final: str | os.PathLike) -> list[Path]:
    """Remove the temporary siblings of ``final`` that writers killed mid-write left; return them.

    Only our own names for this ``final`` (``.<name>.<host>-<pid>-<random>.tmp|.old``) whose
    writer ran on this host and is no longer running: a concurrent export's staging folder stays.
    A set-aside ``.old`` folder is kept while ``final`` is missing - the writer died between the two
    renames of the swap, and it holds the only copy of the previous export. Never raises: a
    leftover that cannot be removed must not stop the write that found it.
    """
    final = Path(final)
    owned = rf"\.{re.escape(final.name)}\.(?P<host>[0-9a-f]{{8}})-(?P<pid>\d+)-[a-z0-9_]+\.(?P<kind>tmp|old)"
    pattern = re.compile(owned, re.ASCII)
    removed = []
    try:
        siblings = list(final.parent.iterdir())
    except OSError:
        return removed
    for path in siblings:
        match = pattern.fullmatch(path.name)
        if match is None or match["host"] != _host_id() or _process_running(int(match["pid"])):
            continue
        if match["kind"] == "old" and not os.path.lexists(final):
            continue
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError:
            continue
        removed.append(path)
    return removed


def _owned_prefix(final: Path) -> str:
    """``.<name>.<host>-<pid>-``: a temporary name that says which process writes it."""
    return f".{final.name}.{_host_id()}-{os.getpid()}-"


def _host_id() -> str:
    """This machine, as 8 hex digits: a pid means nothing on another host sharing the folder (NFS)."""
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def _process_running(pid: int) -> bool:
    """Whether process ``pid`` exists (signal 0 checks without sending). Unsure means running."""
    if pid == os.getpid():
        return True
    if os.name == "nt":  # os.kill would terminate it there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, as another user's
        return True
    return True


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())
