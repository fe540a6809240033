"""Carry the source model's tokenizer into every export (and find its SentencePiece model)."""

from __future__ import annotations

import shutil
from pathlib import Path

# Files a Hugging Face tokenizer (and llama.cpp's converter) may need, copied verbatim.
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)


def copy_tokenizer_files(source: str | Path, destination: Path) -> list[str]:
    """Copy the tokenizer files of ``source`` into ``destination``; return the names copied.

    ``source`` is a local model directory; for a hub name the tokenizer is loaded and saved
    with ``save_pretrained`` instead. Raises FileNotFoundError when nothing could be copied,
    because an export without its tokenizer cannot be used.
    """
    src = Path(source)
    copied = []
    if src.is_dir():
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, destination / name)
                copied.append(name)
    else:
        from qblora_pl.sources import load_tokenizer

        load_tokenizer(str(source)).save_pretrained(destination)
        copied = sorted(p.name for p in destination.iterdir() if p.name in TOKENIZER_FILES)
    if not any(name in copied for name in ("tokenizer.model", "tokenizer.json")):
        raise FileNotFoundError(
            f"no tokenizer found in {source!s} (looked for {', '.join(TOKENIZER_FILES[:2])}); "
            f"an export without its tokenizer cannot be used"
        )
    return copied


def sentencepiece_model_path(source: str | Path) -> Path | None:
    """``tokenizer.model`` of a local model directory, or None."""
    path = Path(source) / "tokenizer.model"
    return path if path.is_file() else None
