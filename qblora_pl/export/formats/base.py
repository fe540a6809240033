"""The export-format interface and its registry.

An export format is a small class with a ``name``, the ``location`` it writes under the export
directory, and three methods:

* :meth:`ExportFormat.check` - run when ``fit`` starts (``MergeExport.setup``) and when
  ``main.py export`` starts: refuse, in one line, a model this format cannot write (a non-Llama
  model for ``gguf``, a bit width the layout lacks), before any training;
* :meth:`ExportFormat.write` - write the merged model (a :class:`~qblora_pl.export.snapshot.ModelSnapshot`);
* :meth:`ExportFormat.load` - load what it wrote back as a ``torch`` model for the verification.

Formats register themselves (:func:`register_export_format`); ``formats: [...]`` in
``MergeExport`` and ``main.py export --formats`` name them. docs/extending.md shows how to add one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from torch import nn



@dataclass(frozen=True)
class Requirement:
    """A module an export format imports, the distribution that installs it and how to install it."""

    module: str
    distribution: str
    install: str
    verify_only: bool  # needed only to load the export back for verification


class UnsupportedExportFormat(ValueError):
    """A requested export format cannot write this model (its architecture, bit width or group size)."""


@dataclass(frozen=True)
class ExportOptions:
    """The export's settings (``MergeExport`` / ``main.py export`` arguments); each format reads its own.

    ``native_bits`` / ``native_group_size`` re-quantize layers that are not INT-b after merging
    (dense LoRA / Q-BLoRA merges) for the low-bit formats; ``format_options`` holds the settings of
    any other format by name (``{"my-format": {"level": 3}}``), so a new format needs no new argument.
    """

    native_bits: int = 4
    native_group_size: int = 32
    gguf_fallback: str = "f16"
    gguf_dense_type: str = "auto"
    dense_dtype: str = "float16"
    round_zero_points: bool = False
    format_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def of(self, format_name: str) -> dict[str, Any]:
        """The ``format_options`` entry of ``format_name`` (empty when none was given)."""
        return dict(self.format_options.get(format_name) or {})


@dataclass(frozen=True)
class ExportPlan:
    """What an export will hold, known before training, for :meth:`ExportFormat.check`.

    ``low_bit`` is ``(bits, group_size)`` of the layers the low-bit formats write: the base's for
    methods that merge into its offsets (QA-LoRA, QA-BLoRA), the re-quantization's
    (``native_bits`` / ``native_group_size``) for dense merges.
    """

    model_config: Any  # a transformers PretrainedConfig
    low_bit: tuple[int, int]
    merges_into_offsets: bool


@dataclass
class ExportContext:
    """Everything :meth:`ExportFormat.write` gets: the merged model and where and how to write it."""

    snapshot: Any  # qblora_pl.export.snapshot.ModelSnapshot
    export_dir: Path  # the (staging) export directory; a format writes under ``export_dir / location``
    tokenizer_source: str | Path
    options: ExportOptions
    method: dict[str, Any] | None = None
    trained_with_integer_zero_points: bool = False

    def path(self, fmt: "ExportFormat") -> Path:
        return self.export_dir / fmt.location


class ExportFormat(ABC):
    """One export format. Subclasses set ``name`` and ``location`` and implement ``write`` and ``load``."""

    #: the name ``formats: [...]`` uses
    name: ClassVar[str]
    #: the file or folder it writes, under the export directory
    location: ClassVar[str]
    #: written when ``formats`` is not given (formats that need an optional package to verify are not)
    default: ClassVar[bool] = False
    #: packages beyond the core dependencies: checked before training (:mod:`qblora_pl.export.preflight`)
    requirements: ClassVar[tuple[Requirement, ...]] = ()
    #: architectures (``config.model_type``) it writes; None: any transformers loads
    model_types: ClassVar[tuple[str, ...] | None] = None

    def check(self, plan: ExportPlan, options: ExportOptions) -> None:
        """Raise :class:`UnsupportedExportFormat` when this format cannot write the model ``plan`` describes."""
        model_type = getattr(plan.model_config, "model_type", None)
        if self.model_types is not None and plan.model_config is not None and model_type not in self.model_types:
            raise UnsupportedExportFormat(
                f"export format {self.name!r} writes model_type {' / '.join(map(repr, self.model_types))} only, and "
                f"this model is {model_type!r}; drop {self.name!r} from formats (native and hf write any model)"
            )

    @abstractmethod
    def write(self, context: ExportContext) -> dict[str, Any]:
        """Write the merged model under ``context.path(self)``; return a summary with at least ``path``."""

    @abstractmethod
    def load(self, path: Path) -> tuple[nn.Module, str]:
        """The written model as a ``torch`` module (logits from ``input_ids``) and the client that loaded it."""


_REGISTRY: dict[str, ExportFormat] = {}


def register_export_format(fmt: ExportFormat | type[ExportFormat]) -> ExportFormat:
    """Add ``fmt`` (a class, or an instance) to the formats ``formats: [...]`` may name; returns ``fmt``.

    Usable as a class decorator. A name already taken is refused (unregister it first).
    """
    instance = fmt() if isinstance(fmt, type) else fmt
    if instance.name in _REGISTRY and type(_REGISTRY[instance.name]) is not type(instance):
        raise ValueError(f"export format {instance.name!r} is already registered ({type(_REGISTRY[instance.name]).__name__})")
    _REGISTRY[instance.name] = instance
    return fmt


def unregister_export_format(name: str) -> None:
    _REGISTRY.pop(name, None)


def export_format(name: str) -> ExportFormat:
    """The registered format called ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"export format {name!r} is not among {registered_formats()}") from None


def registered_formats() -> list[str]:
    return list(_REGISTRY)


def default_formats() -> list[str]:
    return [name for name, fmt in _REGISTRY.items() if fmt.default]


def check_formats(formats: Sequence[str]) -> list[str]:
    """``formats`` as registered names, without repeats (else ValueError naming the unknown ones).

    An entry may also be the import path of an :class:`ExportFormat` subclass
    (``my_package.formats.MyFormat``, as adapters are named by ``class_path``): it is imported,
    registered and replaced by its ``name``.
    """
    if isinstance(formats, str):
        formats = [formats]
    formats = list(dict.fromkeys(_register_by_path(f) if f not in _REGISTRY and "." in f else f for f in formats))
    unknown = [f for f in formats if f not in _REGISTRY]
    if unknown or not formats:
        raise ValueError(f"export formats {unknown or formats} are not among {registered_formats()}")
    return formats


def _register_by_path(path: str) -> str:
    import importlib

    module_name, _, class_name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"export format {path!r} is neither a registered format {registered_formats()} nor an "
                         f"importable class ({type(err).__name__}: {err})") from err
    if not (isinstance(cls, type) and issubclass(cls, ExportFormat)):
        raise ValueError(f"export format {path!r} is not an ExportFormat subclass")
    register_export_format(cls)
    return cls.name


def check_model_support(formats: Sequence[str], plan: ExportPlan, options: ExportOptions) -> None:
    """Every format's :meth:`~ExportFormat.check`; one :class:`UnsupportedExportFormat` naming each refusal."""
    problems = []
    for name in check_formats(formats):
        try:
            export_format(name).check(plan, options)
        except UnsupportedExportFormat as err:
            problems.append(str(err))
    if problems:
        raise UnsupportedExportFormat("; ".join(problems))
