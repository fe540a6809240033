"""Calibrated INT-b bases: the calibration set, and true-sequential GPTQ over a whole model.

:class:`CalibrationSet` holds the token ids GPTQ calibrates on. They come from the run's own
training split, rendered with the run's template and tokenizer
(:meth:`qblora_pl.data.datamodule.InstructionDataModule.calibration_set`): ``records``
examples drawn with a fixed seed, each cut to ``seq_len`` tokens. Its :attr:`digest` names the
exact tokens, so a checkpoint can record which base it was trained on.

:func:`quantize_model_gptq` quantizes every target linear layer of a decoder-only model, one
decoder layer at a time, as GPTQ does:

1. the calibration sequences run through the embeddings once; the inputs of the first
   decoder layer are kept (on the compute device);
2. for each decoder layer: its target linears' input Hessians are accumulated over every
   sequence (linears reading the same input, e.g. q/k/v, share one), each linear is quantized
   by :func:`~qblora_pl.quantization.gptq.gptq_quantize` with the MSE group search, and the
   sequences run through the *quantized* layer, whose outputs are the next layer's inputs.
   So every layer is calibrated on what the already-quantized layers before it produce.

Peak memory on the compute device: the quantized layers done so far, plus one decoder layer in
float32, plus its Hessians (``4 * d_in^2`` bytes per distinct input: ``hidden^2`` twice and
``intermediate^2`` once for a Llama layer), plus the kept activations, ``2 * 4 * tokens * hidden``
bytes (inputs and outputs of the current layer), plus one sequence's activations inside the
layer. For a 7B Llama (hidden 4096, intermediate 11008) at 128 records x 512 tokens that is
0.8 GB (one layer) + 0.6 GB (Hessians) + 2.1 GB (activations) beside the 3.5 GB INT4 base.
The float model itself waits in CPU memory.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from qblora_pl.quantization.gptq import HessianAccumulator, gptq_quantize
from qblora_pl.quantization.int_layer import dequantized_weight_cache

__all__ = ["CalibrationSet", "CalibrationSource", "decoder_layers", "quantize_model_gptq", "select_calibration"]


@dataclass(frozen=True)
class CalibrationSet:
    """Calibration token sequences (1-D int64 tensors, no padding) and where they came from."""

    sequences: tuple[Tensor, ...]
    source: str = "calibration sequences"
    _digest: list[str] = field(default_factory=list, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.sequences:
            raise ValueError(f"the calibration set from {self.source} is empty: GPTQ needs at least one sequence")

    @property
    def tokens(self) -> int:
        return sum(int(s.numel()) for s in self.sequences)

    @property
    def digest(self) -> str:
        """16 hex digits of the SHA-256 of the token ids, sequence by sequence."""
        if not self._digest:
            sha = hashlib.sha256()
            for sequence in self.sequences:
                sha.update(sequence.to(torch.int64).cpu().numpy().tobytes())
                sha.update(b"|")
            self._digest.append(sha.hexdigest()[:16])
        return self._digest[0]

    def describe(self) -> str:
        return f"{len(self.sequences)} sequences, {self.tokens:,} tokens from {self.source} (digest {self.digest})"


#: What a quantization backend is given to calibrate with: ``(records, seq_len) -> CalibrationSet``.
#: Called only when a calibrated base is not found in the cache.
CalibrationSource = Callable[[int, int], CalibrationSet]


def select_calibration(examples: Sequence[Tensor], records: int, seq_len: int, seed: int,
                       source: str = "the training split") -> CalibrationSet:
    """``records`` of ``examples`` drawn with ``seed`` (kept in split order), each cut to ``seq_len`` tokens.

    All of them when there are fewer. Deterministic: the same examples, records, seq_len and
    seed give the same set.
    """
    if records < 1 or seq_len < 1:
        raise ValueError(f"calibration_records={records} and calibration_seq_len={seq_len} must be >= 1")
    generator = torch.Generator().manual_seed(seed)
    chosen = sorted(torch.randperm(len(examples), generator=generator)[:records].tolist())
    sequences = tuple(torch.as_tensor(examples[i])[:seq_len].to(torch.int64).clone() for i in chosen)
    return CalibrationSet(sequences, f"{source} ({len(chosen)} of {len(examples)} examples, seed {seed}, "
                                     f"cut to {seq_len} tokens)")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder layers: the ``ModuleList`` of ``config.num_hidden_layers`` blocks."""
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    candidates = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    for modules in candidates:
        if n_layers is None or len(modules) == n_layers:
            return modules
    raise ValueError(f"{type(model).__name__}: no list of {n_layers} decoder layers found; GPTQ calibration needs "
                     "a decoder-only model with its layers in one ModuleList (e.g. model.model.layers)")


class _StopForward(Exception):
    """Raised by the capture hook once the first decoder layer's inputs are recorded."""


@torch.no_grad()
def _first_layer_inputs(model: nn.Module, layers: nn.ModuleList, calibration: CalibrationSet,
                        device: torch.device) -> list[tuple[Tensor, dict[str, Any]]]:
    """Run each sequence up to the first decoder layer; return its ``(hidden_states, kwargs)`` per sequence."""
    captured: list[tuple[Tensor, dict[str, Any]]] = []

    def capture(_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "cache", "past_key_values")}
        captured.append((hidden, kwargs))
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        for sequence in calibration.sequences:
            try:
                model(input_ids=sequence.unsqueeze(0).to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    if len(captured) != len(calibration.sequences):
        raise RuntimeError(f"captured the first decoder layer's inputs for {len(captured)} of "
                           f"{len(calibration.sequences)} calibration sequences")
    return captured


def _run_layer(layer: nn.Module, hidden: Tensor, kwargs: dict[str, Any]) -> Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _target_linears(layer: nn.Module, is_target: Callable[[str], bool]) -> dict[str, nn.Linear]:
    return {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear) and name and is_target(name)}


@torch.no_grad()
def _shared_input_groups(layer: nn.Module, linears: dict[str, nn.Linear], sample: tuple[Tensor, dict]) -> list[list[str]]:
    """Linears grouped by the input tensor they read in one forward (q/k/v share one, gate/up another)."""
    seen: dict[str, Tensor] = {}  # the input tensors themselves: kept alive, so no two share an id

    def record(name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            seen.setdefault(name, args[0])
        return hook

    handles = [m.register_forward_pre_hook(record(name)) for name, m in linears.items()]
    try:
        _run_layer(layer, *sample)
    finally:
        for handle in handles:
            handle.remove()
    groups: dict[int, list[str]] = {}
    for name in linears:
        if name not in seen:
            raise RuntimeError(f"GPTQ: linear layer {name} was not called in its decoder layer's forward")
        groups.setdefault(id(seen[name]), []).append(name)
    return list(groups.values())


def quantize_model_gptq(
    model: nn.Module,
    is_target: Callable[[str], bool],
    make_layer: Callable[[nn.Linear, tuple[Tensor, Tensor, Tensor]], nn.Module],
    quantizer: Any,
    calibration: CalibrationSet,
    device: torch.device | str,
    param_dtype: torch.dtype,
    damp: float = 0.01,
    progress: bool = True,
) -> dict[str, Any]:
    """True-sequential GPTQ of ``model``'s target linears in place (module docstring).

    ``is_target(name)`` picks the linears (names relative to their decoder layer);
    ``make_layer(linear, (codes, scales, offsets))`` builds the quantized replacement.
    Returns a summary: layers, time in seconds, and the calibration description.
    """
    from tqdm.auto import tqdm

    device = torch.device(device)
    started = time.perf_counter()
    layers = decoder_layers(model)
    # Everything but the decoder layers goes to the device (embeddings, rotary tables, final norm,
    # head); the layers follow one at a time.
    parked = [layer.to("cpu") for layer in layers]
    holder = nn.ModuleList()
    _swap_children(model, layers, holder)
    model.to(device)
    _swap_children(model, holder, layers)
    samples = _first_layer_inputs(model, layers, calibration, device)
    quantized: list[str] = []
    bar = tqdm(total=len(parked), desc=f"GPTQ INT{quantizer.bits} g{quantizer.group_size}", unit="layer",
               disable=not progress, dynamic_ncols=True)
    try:
        for index, layer in enumerate(parked):
            layer.to(device)
            linears = _target_linears(layer, is_target)
            if linears:
                groups = _shared_input_groups(layer, linears, samples[0])
                accumulators = {group[0]: HessianAccumulator(linears[group[0]].in_features, device) for group in groups}
                handles = [linears[lead].register_forward_pre_hook(_accumulate(acc)) for lead, acc in accumulators.items()]
                try:
                    for hidden, kwargs in samples:
                        _run_layer(layer, hidden, kwargs)
                finally:
                    for handle in handles:
                        handle.remove()
                for group in groups:
                    hessian = accumulators.pop(group[0]).hessian()
                    for name in group:
                        linear = linears[name]
                        result = gptq_quantize(quantizer, linear.weight, hessian, damp=damp,
                                               param_dtype=param_dtype, params="mse")
                        parent_name, _, child = name.rpartition(".")
                        parent = layer.get_submodule(parent_name) if parent_name else layer
                        setattr(parent, child, make_layer(linear, result))
                        quantized.append(f"layers.{index}.{name}")
                    del hessian
            with dequantized_weight_cache(layer):  # each quantized weight unpacked once, not once per sequence
                samples = [(_run_layer(layer, hidden, kwargs), kwargs) for hidden, kwargs in samples]
            bar.update(1)
    finally:
        bar.close()
    return {"layers": quantized, "seconds": time.perf_counter() - started, "calibration": calibration.describe()}


def _accumulate(accumulator: HessianAccumulator):
    def hook(_module: nn.Module, args: tuple) -> None:
        accumulator.add(args[0])
    return hook


def _swap_children(root: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Replace the child module ``old`` (wherever it sits under ``root``) by ``new``."""
    for module in root.modules():
        for name, child in module.named_children():
            if child is old:
                setattr(module, name, new)
                return
    raise RuntimeError("decoder layer list not found under the model")
