"""`pip install -e .` (no extras) installs everything the shipped configs import at run time."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RUNTIME_SOURCES = [REPO / "main.py", *sorted((REPO / "qblora_pl").rglob("*.py")), *sorted((REPO / "callbacks").rglob("*.py"))]

#: Packages needed at run time that no file imports by name: a library loads them for us.
IMPLIED = {
    "accelerate": "transformers' bitsandbytes 4-bit loading (NF4 base: configs/qlora.yaml, configs/qblora.yaml)",
}


#: Modules only optional features import, each installed by an extra: module -> (the extra declaring
#: it, its distribution). The distribution is named here because the default test run has the extras
#: uninstalled, and an uninstalled module cannot be mapped to its distribution (llama_cpp ->
#: llama-cpp-python).
OPTIONAL = {
    "torchao": ("fsdp-nf4", "torchao"),  # NF4(implementation: torchao): qblora_pl/quantization/torchao_nf4.py
    "mlx": ("mlx", "mlx"),  # the MLX client: qblora_pl/export/mlx_loader.py
    "mlx_lm": ("mlx", "mlx-lm"),
    "llama_cpp": ("integration", "llama-cpp-python"),  # the llama.cpp client: qblora_pl/export/verify.py
}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared_dependencies() -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return {_normalise(re.split(r"[\s<>=!~;\[]", spec, maxsplit=1)[0]) for spec in project["dependencies"]}


def declared_extra(extra: str) -> set[str]:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    return {_normalise(re.split(r"[\s<>=!~;\[]", spec, maxsplit=1)[0]) for spec in extras[extra]}


def third_party_imports() -> dict[str, set[str]]:
    """Top-level modules imported anywhere in the runtime code (lazy imports included) -> files."""
    found: dict[str, set[str]] = {}
    for path in RUNTIME_SOURCES:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ("qblora_pl", "callbacks", "__future__"):
                    found.setdefault(top, set()).add(str(path.relative_to(REPO)))
    return found


def test_every_runtime_import_is_a_declared_dependency():
    declared = declared_dependencies()
    distributions = importlib.metadata.packages_distributions()
    missing = []
    for module, files in sorted(third_party_imports().items()):
        if module in OPTIONAL:
            extra, distribution = OPTIONAL[module]
            if _normalise(distribution) not in declared_extra(extra):
                missing.append(f"{module} (optional: {distribution} is not in the [{extra}] extra)")
            continue
        names = {_normalise(d) for d in distributions.get(module, [module])}
        if not names & declared:
            missing.append(f"{module} (distribution {sorted(names)}; imported by {', '.join(sorted(files)[:3])})")
    assert not missing, "imported at run time but not in [project].dependencies: " + "; ".join(missing)


@pytest.mark.parametrize("module", sorted(OPTIONAL))
def test_optional_modules_are_installed_by_their_distribution(module):
    """The distribution named in OPTIONAL is the one that provides the module, where it is installed."""
    installed = importlib.metadata.packages_distributions().get(module)
    if not installed:
        pytest.skip(f"{module} is not installed here")
    assert _normalise(OPTIONAL[module][1]) in {_normalise(d) for d in installed}


@pytest.mark.parametrize("package", sorted(IMPLIED))
def test_implied_runtime_dependencies_are_declared(package):
    assert _normalise(package) in declared_dependencies(), f"{package}: needed by {IMPLIED[package]}"


def test_nf4_loading_really_needs_accelerate(tiny_model_dir, monkeypatch):
    """Why accelerate is declared: without it the NF4 configs stop at model loading."""
    from transformers.quantizers import quantizer_bnb_4bit

    from qblora_pl.quantization import NF4

    monkeypatch.setattr(quantizer_bnb_4bit, "is_accelerate_available", lambda *a, **k: False)
    with pytest.raises(ImportError, match="accelerate"):
        NF4().load(str(tiny_model_dir))


def test_shipped_configs_name_only_installed_classes():
    """Every class_path in configs/ (and the parts they include) imports from qblora_pl, lightning or torch."""
    import importlib

    for config in sorted((REPO / "configs").rglob("*.yaml")):
        for class_path in re.findall(r"class_path:\s*([\w.]+)", config.read_text()):
            assert class_path.split(".")[0] in ("qblora_pl", "lightning", "torch"), (config.name, class_path)
            module, _, name = class_path.rpartition(".")
            assert hasattr(importlib.import_module(module), name), (config.name, class_path)
