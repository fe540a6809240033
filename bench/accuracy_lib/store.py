"""The results file that several worker processes fill together: claims and merged writes under a file lock."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path

from bench.accuracy_lib.common import run_key
from bench.accuracy_lib.plan import is_done


class ResultsStore:
    """One results file (``--out``) that several worker processes on this machine fill together.

    Start the same command twice (e.g. one per core, ``OMP_NUM_THREADS=1``) and the two split the
    planned runs: before a run, a worker *claims* it under an exclusive lock (``<out>.lock``),
    skipping runs already stored or claimed by a live process (claims: ``<out>.claims``,
    run key -> pid; a claim whose process has died - a killed session - is taken over). Each
    finished run is merged into the file as it is on disk *at that moment* and written atomically
    (temporary file + rename), so no worker overwrites another's rows and a crash mid-write
    leaves the previous file intact.
    """

    def __init__(self, path: Path, settings: dict):
        self.path, self.settings = path, settings
        self.lock_path = path.with_name(path.name + ".lock")
        self.claims_path = path.with_name(path.name + ".claims")  # not *.json: result globs skip it

    @contextlib.contextmanager
    def locked(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def read(self) -> dict:
        return json.loads(self.path.read_text()) if self.path.exists() else {"runs": {}}

    def load(self) -> dict:
        """The file's content (``settings``, ``runs``), read under the lock."""
        with self.locked():
            return self.read()

    def _claims(self) -> dict[str, int]:
        claims = json.loads(self.claims_path.read_text()) if self.claims_path.exists() else {}
        return {key: pid for key, pid in claims.items() if pid == os.getpid() or _alive(pid)}

    def _write(self, path: Path, payload: dict) -> None:
        from qblora_pl.atomic import atomic_file

        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps(payload, indent=1))

    def claim(self, args, run: tuple) -> dict[str, dict] | None:
        """The stored runs if ``run`` is now this process's to do; None if it is done or another's."""
        key = run_key(*run)
        with self.locked():
            results = self.read()["runs"]
            claims = self._claims()
            if is_done(args, run, results) or claims.get(key, os.getpid()) != os.getpid():
                return None
            claims[key] = os.getpid()
            self._write(self.claims_path, claims)
            return results

    def store(self, run: tuple, rows: dict[str, dict]) -> dict[str, dict]:
        """Merge ``rows`` into the file as it is now, release the claim; returns all stored runs."""
        with self.locked():
            results = {**self.read()["runs"], **rows}
            self._write(self.path, {"settings": self.settings, "runs": results})
            self._release(run)
            return results

    def release(self, run: tuple) -> None:
        """Give up the claim on ``run`` without storing anything."""
        with self.locked():
            self._release(run)

    def _release(self, run: tuple) -> None:
        claims = self._claims()
        claims.pop(run_key(*run), None)
        if claims:
            self._write(self.claims_path, claims)
        else:
            self.claims_path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
