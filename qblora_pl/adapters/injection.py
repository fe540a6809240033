"""Apply an adapter strategy to the target linear layers of a model, and report it."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import nn

from qblora_pl.adapters.base import AdaptedLinear, AdapterConfigError, AdapterStrategy
from qblora_pl.quantization.base_layers import describe_base, is_base_linear, logical_numel

# All attention and MLP projections of a Llama-architecture model (QLoRA's choice).
LLAMA_TARGET_MODULES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def find_target_layers(model: nn.Module, target_modules: Sequence[str]) -> list[tuple[str, nn.Module]]:
    """The (qualified name, layer) pairs whose last name component is in ``target_modules``.

    Raises AdapterConfigError when a target name matches no linear layer, listing the linear
    layer names the model does have, so a typo (``qproj``) is caught before any training.
    """
    if not target_modules:
        raise AdapterConfigError("target_modules is empty: name at least one linear layer to adapt")
    targets = set(target_modules)
    found: list[tuple[str, nn.Module]] = []
    seen_short: set[str] = set()
    available: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, AdaptedLinear):
            raise AdapterConfigError(f"layer {name} already carries an adapter; inject once per model")
        if not is_base_linear(module):
            continue
        short = name.rsplit(".", 1)[-1]
        available.add(short)
        if short in targets:
            found.append((name, module))
            seen_short.add(short)
    missing = targets - seen_short
    if missing:
        raise AdapterConfigError(
            f"target_modules {sorted(missing)} match no linear layer in "
            f"{type(model).__name__}; its linear layers are named {sorted(available)}"
        )
    return found


def inject_adapters(model: nn.Module, strategy: AdapterStrategy, target_modules: Sequence[str]) -> dict[str, AdaptedLinear]:
    """Freeze ``model`` and wrap every target layer with ``strategy``'s adapter, in place.

    Every layer is validated before any is replaced, so a bad shape fails with the model
    unchanged. Returns the adapted layers by qualified name.
    """
    layers = find_target_layers(model, target_modules)
    wrapped = {name: strategy.wrap(name, base) for name, base in layers}
    model.requires_grad_(False)
    for name, adapted in wrapped.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, adapted)
        adapted.adapter.requires_grad_(True)
    return wrapped


def adapted_layers(model: nn.Module) -> dict[str, AdaptedLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, AdaptedLinear)}


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameters, counting packed low-bit weights by their logical size.

    A tensor shared by several modules (tied input embedding and output head) counts once.
    """
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = 0
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, AdaptedLinear):
            continue  # its children are counted on their own
        own = [t for t in (*module.parameters(recurse=False), *module.buffers(recurse=False)) if id(t) not in seen]
        if is_base_linear(module):
            if any(id(t) in seen for t in module.parameters(recurse=False)):
                continue  # e.g. an output head tied to the input embedding
            total += logical_numel(module)
        else:
            total += sum(t.numel() for t in own if t.is_floating_point() or isinstance(t, nn.Parameter))
        seen.update(id(t) for t in own)
    return trainable, total


def adapter_summary_rows(layers: dict[str, AdaptedLinear]) -> list[dict]:
    """One row per adapted layer: shapes, base storage and trainable parameter count."""
    rows = []
    for name, layer in layers.items():
        rows.append(
            {
                "layer": name,
                "d_out x d_in": f"{layer.out_features} x {layer.in_features}",
                "base": describe_base(layer.base_layer),
                "adapter": ", ".join(f"{k}{tuple(v)}" for k, v in layer.adapter.shapes().items()),
                "params": sum(p.numel() for p in layer.adapter.parameters()),
            }
        )
    return rows


def format_table(rows: Iterable[dict]) -> str:
    """Plain fixed-width table (no dependency) for start-of-run summaries."""
    rows = list(rows)
    if not rows:
        return "(empty)"
    cols = list(rows[0])
    widths = {c: max(len(str(c)), *(len(str(r[c])) for r in rows)) for c in cols}
    line = "  ".join(str(c).ljust(widths[c]) for c in cols)
    out = [line, "  ".join("-" * widths[c] for c in cols)]
    out += ["  ".join(str(r[c]).ljust(widths[c]) for c in cols) for r in rows]
    return "\n".join(out)
