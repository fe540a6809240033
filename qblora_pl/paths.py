"""Locations of the assets shipped inside the package (model, tokenizer, datasets).

Checkpoints and configs name the embedded model by a portable token, ``embedded:tiny-llama``,
never by its absolute path, so a checkpoint keeps working after the checkout (or the installed
package) moves: :func:`resolve_model_reference` turns the token into this installation's path.
"""

from __future__ import annotations

import os
from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
EMBEDDED_MODEL_DIR = ASSETS_DIR / "tiny-llama"
EMBEDDED_DATA_DIR = ASSETS_DIR / "data"

#: Prefix of a portable reference to a model shipped in ``qblora_pl/assets``.
EMBEDDED_PREFIX = "embedded:"
#: The default model, as recorded in configs and checkpoints.
EMBEDDED_MODEL = EMBEDDED_PREFIX + EMBEDDED_MODEL_DIR.name


def resolve_model_reference(reference: str | os.PathLike) -> str:
    """The path or hub name to load for a model reference.

    ``embedded:<name>`` becomes ``qblora_pl/assets/<name>`` of this installation. An absolute path
    that does not exist but ends in ``qblora_pl/assets/<name>`` (an old checkpoint's record of the
    embedded model in a checkout that has since moved) becomes the same. Anything else is returned
    unchanged (a missing path is reported by :mod:`qblora_pl.sources`, naming it).
    """
    text = os.fspath(reference)
    if text.startswith(EMBEDDED_PREFIX):
        name = text[len(EMBEDDED_PREFIX):]
        if not name or "/" in name or "\\" in name or name in (".", ".."):
            raise ValueError(f"model reference {text!r}: expected {EMBEDDED_PREFIX}<name of a model in {ASSETS_DIR}>")
        return str(ASSETS_DIR / name)
    path = Path(text)
    if path.is_absolute() and not path.exists() and path.parent.name == "assets" \
            and path.parent.parent.name == "qblora_pl" and (ASSETS_DIR / path.name / "config.json").is_file():
        return str(ASSETS_DIR / path.name)
    return text


def resolve_data_reference(data_path: str | os.PathLike) -> str:
    """``data_path`` itself, or this installation's copy of embedded data a moved checkout recorded.

    A checkpoint records the embedded data set by its absolute path (``.../qblora_pl/assets/data/
    instructions``); after the checkout moves, that path no longer exists and maps to the same
    folder under this installation's assets. Anything else is returned unchanged.
    """
    text = os.fspath(data_path)
    path = Path(text)
    if not path.is_absolute() or path.exists():
        return text
    parts = path.parts
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == ("qblora_pl", "assets", "data"):
            candidate = EMBEDDED_DATA_DIR.joinpath(*parts[i + 3 :])
            return str(candidate) if candidate.exists() else text
    return text


def portable_model_reference(model_name_or_path: str | os.PathLike) -> str:
    """How a checkpoint records a model: ``embedded:<name>`` for a model shipped in the package."""
    text = os.fspath(model_name_or_path)
    if text.startswith(EMBEDDED_PREFIX):
        return text
    try:
        path = Path(resolve_model_reference(text)).expanduser().resolve()
    except (OSError, ValueError):
        return text
    if path.parent == ASSETS_DIR and (path / "config.json").is_file():
        return EMBEDDED_PREFIX + path.name
    return text
