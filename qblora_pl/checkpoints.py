"""Adapter checkpoints: reading them safely and checking that they fit the model.

Shared by the LightningModule (``on_load_checkpoint``), the FSDP2 strategy (its own
``load_checkpoint``), the CLI (``--ckpt_path`` is read before anything is built) and the
exporter, so none of them imports another to get it.
"""

from __future__ import annotations

import importlib
import math
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

ADAPTER_CHECKPOINT_FORMAT = 1

#: Fields of the base model's ``config.json`` recorded in a checkpoint (``adapter_spec["base"]``):
#: a checkpoint resumes, tests or exports only on a base with the same values, wherever it lives.
BASE_FINGERPRINT_KEYS = (
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "tie_word_embeddings",
)


#: Adapter arguments that may differ between a checkpoint and the model it loads into (they change
#: neither the adapter's shapes nor the function it computes in eval mode).
CHANGEABLE_ADAPTER_ARGS = frozenset({"dropout"})


class AdapterCheckpointMismatch(RuntimeError):
    """An adapter checkpoint does not fit the model it is being loaded into."""


class UnreadableCheckpoint(ValueError):
    """A ``--ckpt_path`` file that is not a readable qblora_pl checkpoint (truncated, empty, foreign)."""


class NonFiniteAdapterError(FloatingPointError):
    """The adapters hold NaN / inf (or the run diverged): they must not be written over a good checkpoint."""


def read_checkpoint(path: str | os.PathLike, what: str = "ckpt_path") -> dict[str, Any]:
    """``torch.load`` a qblora_pl checkpoint on the CPU, or raise :class:`UnreadableCheckpoint` naming the file.

    Checkpoints hold plain data only, so they are read with ``weights_only=True``; a file that
    needs unpickling of arbitrary objects is not one of ours and is refused rather than executed.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise UnreadableCheckpoint(f"{what} {str(path)!r} does not exist")
    if path.is_dir():
        raise UnreadableCheckpoint(f"{what} {str(path)!r} is a directory, not a checkpoint file (.ckpt)")
    size = path.stat().st_size
    hint = "it is not a readable qblora_pl checkpoint"
    if size == 0:
        raise UnreadableCheckpoint(f"{what} {str(path)!r} is empty (0 bytes): {hint} (an interrupted copy or save?)")
    try:
        checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError, zipfile.BadZipFile, ValueError, OSError,
            UnicodeDecodeError, AttributeError, TypeError, KeyError, IndexError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "weights_only" in str(err):
            reason = "it holds objects other than tensors and plain data (torch.load weights_only=True refused it)"
        raise UnreadableCheckpoint(
            f"{what} {str(path)!r} ({size:,} bytes) could not be read: {hint} ({type(err).__name__}: {reason}). "
            "A truncated file (disk full, interrupted copy) cannot be repaired; use another checkpoint "
            "(e.g. the run's other step*.ckpt files)"
        ) from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise UnreadableCheckpoint(
            f"{what} {str(path)!r} was read but holds {type(checkpoint).__name__}"
            f"{' without a state_dict' if isinstance(checkpoint, dict) else ''}: {hint}"
        )
    if "adapter_spec" not in checkpoint:
        raise UnreadableCheckpoint(
            f"{what} {str(path)!r} is a Lightning checkpoint without an adapter_spec: {hint} "
            "(it was not written by qblora_pl's QuantizedCausalLM)"
        )
    return checkpoint


def non_finite_entries(state: dict[str, torch.Tensor], limit: int = 3) -> list[str]:
    """``name (n of m non-finite)`` for the first ``limit`` tensors holding NaN or inf."""
    bad = []
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            continue
        n_bad = int((~torch.isfinite(tensor.detach())).sum())
        if n_bad:
            bad.append(f"{name} ({n_bad} of {tensor.numel()} non-finite)")
            if len(bad) >= limit:
                break
    return bad


def base_fingerprint(config: Any) -> dict[str, Any]:
    """The ``BASE_FINGERPRINT_KEYS`` of a Hugging Face model config (those it has)."""
    return {key: getattr(config, key) for key in BASE_FINGERPRINT_KEYS if hasattr(config, key)}


def check_adapter_spec(saved: dict, current: dict, saved_keys: set[str], current_keys: set[str]) -> None:
    """Raise AdapterCheckpointMismatch naming what differs; a mismatch never loads silently."""
    if saved.get("format", ADAPTER_CHECKPOINT_FORMAT) > ADAPTER_CHECKPOINT_FORMAT:
        raise AdapterCheckpointMismatch(
            f"checkpoint adapter format {saved['format']} is newer than this qblora_pl reads "
            f"({ADAPTER_CHECKPOINT_FORMAT}); upgrade qblora_pl"
        )
    if saved["strategy"] != current["strategy"]:
        raise AdapterCheckpointMismatch(
            f"checkpoint adapter is {saved['strategy']} but the model uses {current['strategy']}"
        )
    if saved.get("strategy_hparams") is not None and current.get("strategy_hparams") is not None:
        for key in sorted(set(saved["strategy_hparams"]) & set(current["strategy_hparams"]) - CHANGEABLE_ADAPTER_ARGS):
            if not same_setting(saved["strategy_hparams"][key], current["strategy_hparams"][key]):
                raise AdapterCheckpointMismatch(
                    f"checkpoint adapter {saved['strategy']} has {key}={saved['strategy_hparams'][key]!r} but the "
                    f"model's has {key}={current['strategy_hparams'][key]!r}"
                )
    if saved["quantization"] != current["quantization"]:
        raise AdapterCheckpointMismatch(_base_difference(saved["quantization"], current["quantization"]))
    saved_base, current_base = saved.get("base"), current.get("base")
    if saved_base and current_base:
        for key in sorted(set(saved_base) & set(current_base)):
            if saved_base[key] != current_base[key]:
                raise AdapterCheckpointMismatch(
                    f"checkpoint was trained on base model {saved.get('model_name_or_path')!r} with {key}="
                    f"{saved_base[key]!r}, but the model {current.get('model_name_or_path')!r} has {key}="
                    f"{current_base[key]!r}: not the same base model"
                )
    for name, shapes in current["layers"].items():
        if saved["layers"].get(name) != shapes:
            raise AdapterCheckpointMismatch(
                f"layer {name}: checkpoint adapter shapes {saved['layers'].get(name)} != model's {shapes}"
            )
    if saved_keys != current_keys:
        extra, missing = sorted(saved_keys - current_keys)[:5], sorted(current_keys - saved_keys)[:5]
        raise AdapterCheckpointMismatch(f"adapter keys differ: unexpected {extra}, missing {missing}")


def _base_difference(saved: dict[str, Any], current: dict[str, Any]) -> str:
    """Which quantization setting differs, with both values (a base quantized otherwise is another base)."""
    keys = sorted(set(saved) | set(current), key=lambda k: (k != "backend", k))
    differing = [k for k in keys if saved.get(k) != current.get(k)]
    named = "; ".join(f"{k}: checkpoint {saved.get(k, '(not set)')!r}, model {current.get(k, '(not set)')!r}"
                      for k in differing)
    return (f"checkpoint was trained on another quantized base ({named}). Full settings: checkpoint {saved}, "
            f"model {current}. Use the checkpoint's model.quantization settings")


#: Two recorded numbers are the same setting when they agree to this relative tolerance (a float
#: written to YAML or a checkpoint and read back can differ in its last bits).
SAME_SETTING_REL_TOL = 1e-9


def same_setting(a: Any, b: Any) -> bool:
    """The one rule for "is this the same run's setting", used by adapter checkpoints and the CLI's resume check.

    Numbers compare by value (``SAME_SETTING_REL_TOL``); lists element-wise; ``class_path`` dicts as the
    classes they name, with their common ``init_args`` except ``CHANGEABLE_ADAPTER_ARGS``; two strings that
    spell one model location (``embedded:tiny-llama`` and its path) as that location.
    """
    if isinstance(a, dict) and isinstance(b, dict) and "class_path" in a and "class_path" in b:
        if _load_class(a["class_path"]) is not _load_class(b["class_path"]):
            return False
        a_args, b_args = a.get("init_args") or {}, b.get("init_args") or {}
        return all(same_setting(a_args[k], b_args[k]) for k in set(a_args) & set(b_args) - CHANGEABLE_ADAPTER_ARGS)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_setting(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and not isinstance(b, bool):
        return math.isclose(float(a), float(b), rel_tol=SAME_SETTING_REL_TOL)
    if isinstance(a, str) and isinstance(b, str) and a != b:
        from qblora_pl.paths import portable_model_reference, resolve_model_reference

        try:
            return portable_model_reference(resolve_model_reference(a)) == portable_model_reference(resolve_model_reference(b))
        except (OSError, ValueError):
            return False
    return a == b


def _load_class(class_path: str):
    module, _, name = str(class_path).rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return class_path
