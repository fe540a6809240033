"""Real-model tests: SmolLM2-135M-Instruct from its GGUF file (``scripts/fetch_smollm2.py``).

Marked ``realmodel`` and left out of the default test command; ``.ci/run`` fetches the model
and runs them after the unit tests with ``QBLORA_REQUIRE_REAL=1`` (then a missing model or
data file fails instead of skipping). ``QBLORA_SMOLLM2_GGUF`` names another copy of the file.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO.parent / "shared" / "data"


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        message = f"{what} not found at {path}"
        if os.environ.get("QBLORA_REQUIRE_REAL") == "1":
            pytest.fail(message + " (QBLORA_REQUIRE_REAL=1)")
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    if os.environ.get("QBLORA_SMOLLM2_GGUF"):
        return _require(Path(os.environ["QBLORA_SMOLLM2_GGUF"]), "SmolLM2 GGUF ($QBLORA_SMOLLM2_GGUF)")
    from qblora_pl.sources import cache_root

    return _require(cache_root() / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf",
                    "SmolLM2 GGUF (python scripts/fetch_smollm2.py)")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return _require(SHARED_DATA, "the shared benchmark data (../shared/data)")
