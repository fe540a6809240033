"""Locations of the assets shipped inside the package (model, tokenizer, datasets)."""

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
EMBEDDED_MODEL_DIR = ASSETS_DIR / "tiny-llama"
EMBEDDED_DATA_DIR = ASSETS_DIR / "data"
