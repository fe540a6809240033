"""Where models and data come from: the one place that decides "local path or hub name".

A model is named by

* a local Hugging Face model directory (``config.json`` + weights + tokenizer files);
* a local ``.gguf`` file (llama.cpp's format; a directory holding exactly one ``.gguf`` file
  and no ``config.json`` counts as that file). transformers reads it through ``gguf_file``;
  the dequantized model and its tokenizer are converted **once** into a Hugging Face directory
  in the cache (:func:`gguf_cache_dir`), so every quantization backend (bitsandbytes NF4
  included, which transformers refuses to combine with ``gguf_file``), the tokenizer, the
  exports and ``save_pretrained`` see an ordinary model directory;
* a Hugging Face hub name (``HuggingFaceTB/SmolLM2-135M-Instruct``), which needs network or
  the Hugging Face cache.

A data set is named by a local file or directory, or a hub dataset name.

Anything that looks like a path (absolute, ``./``, ``~``, a file suffix, or that exists) is
local, and a missing local path is reported as missing - never sent to the hub, whose error
("Repo id must be in the form ...") would not say what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from qblora_pl.paths import EMBEDDED_PREFIX, resolve_model_reference

#: File suffixes that always mean "a local file" (hub names never end in them).
LOCAL_FILE_SUFFIXES = frozenset({".json", ".jsonl", ".csv", ".gguf", ".parquet", ".txt", ".safetensors", ".bin"})

#: Bump when the converted layout changes, so old cache entries are not reused.
_GGUF_CACHE_FORMAT = 1


class SourceError(ValueError):
    """A model or data source that cannot be used; the message names the value and why."""


class SourceNotFoundError(SourceError, FileNotFoundError):
    """A local-looking model or data path that does not exist."""


def looks_like_local_path(source: str | os.PathLike) -> bool:
    """True for anything that must be a local path rather than a hub name.

    Hub names are ``name`` or ``owner/name``: never absolute, never ``./x`` or ``~/x``, never
    ending in a file suffix, never with more than one ``/``. An existing path is local too.
    """
    text = os.fspath(source)
    path = Path(text).expanduser()
    return (
        path.exists()
        or text.startswith(("/", ".", "~"))
        or path.suffix.lower() in LOCAL_FILE_SUFFIXES
        or text.count("/") > 1
        or (os.sep != "/" and os.sep in text)
    )


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSource:
    """A parsed model reference: what kind it is and how ``from_pretrained`` should read it."""

    spec: str
    kind: Literal["directory", "gguf", "hub"]
    path: Path | None = None

    @classmethod
    def parse(cls, model_name_or_path: str | os.PathLike, *, tokenizer_only: bool = False) -> "ModelSource":
        """Classify and check a model reference; raise :class:`SourceError` naming a bad value.

        ``tokenizer_only`` also accepts a directory holding just tokenizer files.
        """
        spec = os.fspath(model_name_or_path)
        if not spec or not spec.strip():
            raise SourceError("model_name_or_path is empty; pass a model directory, a .gguf file or a hub name")
        if spec.startswith(EMBEDDED_PREFIX):  # embedded:tiny-llama, the model shipped in the package
            try:
                spec = resolve_model_reference(spec)
            except ValueError as err:
                raise SourceError(str(err)) from err
        if not looks_like_local_path(spec):
            return cls(spec, "hub")
        path = Path(spec).expanduser()
        if not path.exists():
            raise SourceNotFoundError(
                f"model path {spec!r} does not exist (resolved to {path.resolve()}); pass an existing "
                "model directory, a .gguf file, or a Hugging Face hub name such as "
                "HuggingFaceTB/SmolLM2-135M-Instruct"
            )
        if path.is_file():
            if path.suffix.lower() != ".gguf":
                raise SourceError(
                    f"model path {spec!r} is a file but not a .gguf file; pass a Hugging Face model "
                    "directory (with config.json) or a .gguf file"
                )
            return cls(spec, "gguf", path.resolve())
        if (path / "config.json").is_file():
            return cls(spec, "directory", path.resolve())
        if tokenizer_only and any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            return cls(spec, "directory", path.resolve())
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return cls(spec, "gguf", ggufs[0].resolve())
        found = f"several .gguf files ({', '.join(p.name for p in ggufs)}): name one" if ggufs else (
            "no config.json and no .gguf file")
        raise SourceError(
            f"model directory {spec!r} has {found}. Pass a Hugging Face model directory, a .gguf "
            "file, or a hub name"
        )

    @property
    def is_local(self) -> bool:
        return self.kind != "hub"

    def pretrained_dir(self) -> str:
        """What to hand ``from_pretrained``: the directory, the hub name, or the GGUF conversion."""
        if self.kind == "gguf":
            return str(convert_gguf(self.path))
        if self.kind == "directory":
            return str(self.path)
        return self.spec

    def describe(self) -> str:
        return {"directory": "model directory", "gguf": "GGUF file", "hub": "hub model"}[self.kind] + f" {self.spec!r}"


def _hub_failure(source: ModelSource, what: str, err: Exception) -> SourceError:
    return SourceError(
        f"could not load the {what} of hub model {source.spec!r}: {type(err).__name__}: {err}. It is not a "
        "local path, so it was looked up on the Hugging Face hub (this needs network access or a copy in the "
        "Hugging Face cache); pass a local model directory or .gguf file to work offline"
    )


def load_causal_lm(model_name_or_path: str | os.PathLike | ModelSource, **kwargs: Any):
    """``AutoModelForCausalLM.from_pretrained`` for any model source (kwargs passed through)."""
    from transformers import AutoModelForCausalLM

    source = model_name_or_path if isinstance(model_name_or_path, ModelSource) else ModelSource.parse(model_name_or_path)
    try:
        return AutoModelForCausalLM.from_pretrained(source.pretrained_dir(), **kwargs)
    except OSError as err:
        if source.kind == "hub":
            raise _hub_failure(source, "weights", err) from err
        raise


def load_tokenizer(model_name_or_path: str | os.PathLike | ModelSource, **kwargs: Any):
    """``AutoTokenizer.from_pretrained`` for any model source (a GGUF file's embedded tokenizer too)."""
    from transformers import AutoTokenizer

    source = (model_name_or_path if isinstance(model_name_or_path, ModelSource)
              else ModelSource.parse(model_name_or_path, tokenizer_only=True))
    try:
        return AutoTokenizer.from_pretrained(source.pretrained_dir(), **kwargs)
    except OSError as err:
        if source.kind == "hub":
            raise _hub_failure(source, "tokenizer", err) from err
        raise


def pretrained_name_or_path(model_name_or_path: str | os.PathLike) -> str:
    """What plain ``from_pretrained`` calls can take for any source: a local directory (a
    ``.gguf`` file's conversion) or the hub name. For scripts that hand the model to other
    libraries (PEFT, lm-eval, bench/)."""
    return ModelSource.parse(model_name_or_path).pretrained_dir()


# --------------------------------------------------------------------------------------------
# GGUF conversion cache
# --------------------------------------------------------------------------------------------


def cache_root() -> Path:
    """``$QBLORA_PL_CACHE``, else ``$XDG_CACHE_HOME/qblora_pl``, else ``~/.cache/qblora_pl``."""
    if os.environ.get("QBLORA_PL_CACHE"):
        return Path(os.environ["QBLORA_PL_CACHE"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "qblora_pl"


def gguf_cache_dir(gguf_path: str | os.PathLike) -> Path:
    """The cache directory of one GGUF file, keyed by its resolved path, size and mtime."""
    path = Path(gguf_path).expanduser().resolve()
    stat = path.stat()
    key = f"{_GGUF_CACHE_FORMAT}|{path}|{stat.st_size}|{stat.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{path.stem}-{digest}"


def convert_gguf(gguf_path: str | os.PathLike, *, progress: bool = True) -> Path:
    """A Hugging Face directory (float32 safetensors, config, tokenizer) with the GGUF's model.

    Made once per file (about 20 s for a 135M model on 2 cores) and reused; written to a
    temporary directory and renamed into place, so an interrupted conversion leaves nothing
    that a later run could mistake for a finished one. float32 holds GGUF's dequantized
    weights exactly (``d * q + m`` of fp16 ``d`` and ``m``).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(gguf_path).expanduser().resolve()
    target = gguf_cache_dir(path)
    if (target / "qblora_gguf_source.json").is_file():
        return target
    if progress:
        print(f"Converting {path.name} to a Hugging Face model directory (once): {target}", flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        except Exception as err:
            raise SourceError(f"GGUF file {str(path)!r} could not be read by transformers' GGUF loader: "
                              f"{type(err).__name__}: {err}") from err
        # The loader dequantized every tensor into a plain float model but leaves transformers'
        # GGUF "quantizer" attached, which makes save_pretrained refuse; drop it.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "qblora_gguf_source.json").write_text(json.dumps(
            {"gguf_file": str(path), "size": path.stat().st_size, "format": _GGUF_CACHE_FORMAT}, indent=2))
        os.chmod(tmp, 0o777 & ~_umask())
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished the same conversion first
            if not (target / "qblora_gguf_source.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def converted_from_gguf(directory: str | os.PathLike) -> Path | None:
    """The ``.gguf`` file a :func:`convert_gguf` directory was made from (None for any other
    directory, or when that file is gone). Exporters read its tokenizer settings from it."""
    record = Path(directory) / "qblora_gguf_source.json"
    if not record.is_file():
        return None
    source = Path(json.loads(record.read_text())["gguf_file"])
    return source if source.is_file() else None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --------------------------------------------------------------------------------------------
# Data sets
# --------------------------------------------------------------------------------------------


def load_hub_dataset(name: str, config: str | None, split: str, error: type[Exception] = SourceError) -> list[dict[str, Any]]:
    """Rows of a Hugging Face hub dataset split as plain dicts (needs network or the HF cache).

    ``error`` is the exception type raised (each caller's own data-error class), with a
    message naming the dataset, config and split.
    """
    import datasets

    try:
        rows = datasets.load_dataset(name, config, split=split)
    except Exception as err:
        raise error(
            f"{name!r} is not an existing local path (checked {Path(name).expanduser().resolve()}) and loading it "
            f"as a Hugging Face hub dataset (config={config!r}, split={split!r}) failed: {type(err).__name__}: {err}"
        ) from err
    return [dict(row) for row in rows]
