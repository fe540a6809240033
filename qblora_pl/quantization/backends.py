"""Quantization backends: how the frozen base model is loaded and quantized.

Chosen in YAML by ``class_path`` (``model.quantization``), independent of the adapter method
(STYLE.md practice 2). Each backend loads a Hugging Face causal LM from a local directory,
a ``.gguf`` file or a hub name (``qblora_pl.sources``) and returns it with its target linear layers quantized and frozen.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from qblora_pl.quantization.base_layers import keep_nf4_layers_trainable

if TYPE_CHECKING:
    from qblora_pl.quantization.calibration import CalibrationSource

DTypeName = Literal["float32", "bfloat16", "float16", "auto"]


def resolve_dtype(name: str) -> torch.dtype:
    """``"auto"`` means bfloat16 where CUDA supports it, float32 otherwise (CPU)."""
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"dtype {name!r} is not one of {sorted(dtypes) + ['auto']}")
    return dtypes[name]


def cast_float_modules(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast every floating parameter and buffer to ``dtype`` except the quantized layers' own.

    ``model.to(dtype)`` would also recast the INT-b layers' scales and offsets, changing the
    storage format (and its memory) that the quantizer chose.
    """
    from qblora_pl.quantization.int_layer import GroupwiseIntLinear

    for module in model.modules():
        if isinstance(module, GroupwiseIntLinear):
            continue
        for tensors in (module._parameters, module._buffers):
            for key, tensor in tensors.items():
                if tensor is not None and tensor.is_floating_point() and tensor.dtype != dtype:
                    tensor.data = tensor.data.to(dtype)


class QuantizationBackend(ABC):
    """Loads a causal LM with its linear layers quantized and frozen."""

    name: str = "quantization"

    @abstractmethod
    def load(self, model_name_or_path: str, calibration: CalibrationSource | None = None) -> nn.Module:
        """Load the model with every linear layer but the output head quantized and frozen.

        ``calibration`` gives calibration token sequences to backends that calibrate (GPTQ).
        """

    def init_args(self) -> dict[str, Any]:
        """The constructor arguments (every backend stores them as public attributes)."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def describe(self) -> dict[str, Any]:
        return {"backend": type(self).__name__, **self.init_args()}

    def _load_float(self, model_name_or_path: str, dtype: torch.dtype, **kwargs: Any) -> nn.Module:
        from qblora_pl.sources import load_causal_lm

        return load_causal_lm(model_name_or_path, dtype=dtype, **kwargs)


class NF4(QuantizationBackend):
    """4-bit NormalFloat (QLoRA's NF4, block size 64): bitsandbytes by default, or torchao.

    ``implementation: bitsandbytes`` loads through transformers' BitsAndBytesConfig (NF4 or FP4);
    bitsandbytes layers cannot be sharded by FSDP2. ``implementation: torchao`` stores each weight
    as torchao's ``NF4Tensor`` (:mod:`qblora_pl.quantization.torchao_nf4`; ``pip install
    'qblora-pl[fsdp-nf4]'``): NF4 with double-quantized scales, which FSDP2 shards
    (``configs/fsdp.yaml``, docs/fsdp.md). Its ``W_hat`` is close to, not bit-identical with,
    bitsandbytes' for the same weight; each implementation trains, merges and exports one
    ``W_hat`` consistently.

    Args:
        quant_type: ``"nf4"`` (QLoRA) or ``"fp4"`` (bitsandbytes only).
        double_quant: quantize the block scales too (QLoRA's double quantization; torchao always does).
        compute_dtype: dtype of the dequantized matmul; ``"auto"`` = bf16 on CUDA, fp32 on CPU. torchao
            quantizes from the weights in this dtype and dequantizes in it.
        implementation: ``"bitsandbytes"`` or ``"torchao"``.
        scaler_block_size: torchao only: NF4 blocks per double-quantization factor (torchao's default
            256); a layer whose block count it does not divide uses the largest power of two below it
            that does. Lower it when FSDP2 cannot shard a layer over your world size (the error says
            which value works).
    """

    name = "nf4"
    IMPLEMENTATIONS = ("bitsandbytes", "torchao")

    def __init__(
        self,
        quant_type: Literal["nf4", "fp4"] = "nf4",
        double_quant: bool = True,
        compute_dtype: DTypeName = "auto",
        implementation: Literal["bitsandbytes", "torchao"] = "bitsandbytes",
        scaler_block_size: int = 256,
    ) -> None:
        if quant_type not in ("nf4", "fp4"):
            raise ValueError(f"quant_type={quant_type!r} must be 'nf4' or 'fp4'")
        if implementation not in self.IMPLEMENTATIONS:
            raise ValueError(f"implementation={implementation!r} must be one of {list(self.IMPLEMENTATIONS)}")
        if implementation == "torchao":
            if quant_type != "nf4" or not double_quant:
                raise ValueError(
                    f"implementation='torchao' is NF4 with double quantization only; got quant_type={quant_type!r}, "
                    f"double_quant={double_quant}"
                )
            if scaler_block_size < 1 or scaler_block_size & (scaler_block_size - 1):
                raise ValueError(f"scaler_block_size={scaler_block_size} must be a power of two")
        elif scaler_block_size != 256:
            raise ValueError(f"scaler_block_size={scaler_block_size} applies to implementation='torchao' only")
        self.quant_type, self.double_quant, self.compute_dtype = quant_type, double_quant, compute_dtype
        self.implementation, self.scaler_block_size = implementation, scaler_block_size

    def init_args(self) -> dict[str, Any]:
        """The constructor arguments; the bitsandbytes default records only the original three.

        Adapter checkpoints record the base by these arguments and refuse a resume on another base,
        so bitsandbytes checkpoints written before ``implementation`` existed keep matching.
        """
        args = super().init_args()
        if self.implementation == "bitsandbytes":
            del args["implementation"], args["scaler_block_size"]
        return args

    def bitsandbytes_config(self):
        """The ``transformers.BitsAndBytesConfig`` this backend loads with (also used by bench/)."""
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.quant_type,
            bnb_4bit_use_double_quant=self.double_quant,
            bnb_4bit_compute_dtype=resolve_dtype(self.compute_dtype),
            bnb_4bit_quant_storage=torch.uint8,
        )

    @staticmethod
    def device_map() -> dict[str, Any]:
        return {"": torch.cuda.current_device()} if torch.cuda.is_available() else {"": "cpu"}

    def load(self, model_name_or_path: str, calibration: CalibrationSource | None = None) -> nn.Module:
        dtype = resolve_dtype(self.compute_dtype)
        if self.implementation == "torchao":
            return self._load_torchao(model_name_or_path, dtype)
        model = self._load_float(
            model_name_or_path, dtype, quantization_config=self.bitsandbytes_config(), device_map=self.device_map()
        )
        model.requires_grad_(False)
        keep_nf4_layers_trainable(model)
        return model

    def _load_torchao(self, model_name_or_path: str, dtype: torch.dtype) -> nn.Module:
        from qblora_pl.quantization.torchao_nf4 import quantize_linear_layers_nf4, torchao_nf4

        torchao_nf4()  # a missing torchao is reported before the model is loaded
        # Quantized from the weights in the compute dtype, as bitsandbytes does (and torchtune).
        model = self._load_float(model_name_or_path, dtype)
        model.requires_grad_(False)
        if torch.cuda.is_available():
            model = model.cuda()
        quantize_linear_layers_nf4(model, max_scaler_block_size=self.scaler_block_size)
        return model


class GroupwiseInt(QuantizationBackend):
    """Group-wise asymmetric INT-b (one scale and one offset per group of input features).

    The base for QA-LoRA and QA-BLoRA, whose updates fold exactly into the offsets.

    Args:
        bits: code width, one of 2, 3, 4, 8.
        group_size: quantization group along the input dimension, one of 32, 64, 128.
        scale_dtype: storage dtype of scales and offsets.
        compute_dtype: dtype the model computes in; ``"auto"`` = bf16 on CUDA, fp32 on CPU.
        init: how the base is made from the float weights (docs/method.md section 3):
            ``rtn``: min-max round-to-nearest (no data);
            ``mse``: round-to-nearest with each group's range searched for the smallest squared
            error (no data; :mod:`qblora_pl.quantization.group_search`);
            ``gptq``: true-sequential GPTQ with the ``mse`` search per group, calibrated on the run's
            own training examples (:mod:`qblora_pl.quantization.calibration`). ``mse`` and ``gptq``
            bases are cached on disk (:mod:`qblora_pl.quantization.base_cache`) and made once.
        calibration_records: ``gptq`` only: training examples to calibrate on (drawn with the data's
            ``split_seed``; all of them when the split is smaller).
        calibration_seq_len: ``gptq`` only: tokens kept of each calibration example.
    """

    name = "int"
    INITS = ("rtn", "mse", "gptq")
    #: GPTQ's dampening (fraction of the mean Hessian diagonal), as in GPTQ and llm-compressor.
    GPTQ_DAMPING = 0.01

    def __init__(
        self,
        bits: int = 4,
        group_size: int = 32,
        scale_dtype: Literal["float16", "bfloat16", "float32"] = "float16",
        compute_dtype: DTypeName = "auto",
        init: str = "rtn",  # one of INITS; a plain str so a bad value gets the constructor's one-line error
        calibration_records: int = 128,
        calibration_seq_len: int = 512,
    ) -> None:
        from qblora_pl.quantization.int_quantizer import GroupwiseIntQuantizer

        GroupwiseIntQuantizer(bits, group_size)  # validates bits and group size now, not mid-run
        resolve_dtype(scale_dtype)
        if init not in self.INITS:
            raise ValueError(f"init={init!r} must be one of {list(self.INITS)}")
        for name, value in (("calibration_records", calibration_records), ("calibration_seq_len", calibration_seq_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        self.bits, self.group_size, self.scale_dtype, self.compute_dtype = bits, group_size, scale_dtype, compute_dtype
        self.init, self.calibration_records, self.calibration_seq_len = init, calibration_records, calibration_seq_len
        #: The digest of the calibration tokens the loaded (or expected) ``gptq`` base was made from.
        #: Set by ``load``; set beforehand (from a checkpoint) to find that base in the cache without data.
        self._calibration_digest: str | None = None

    def init_args(self) -> dict[str, Any]:
        """The constructor arguments; ``rtn`` records only the original four (older checkpoints keep
        matching), ``mse`` adds ``init``, ``gptq`` adds its calibration too."""
        args = super().init_args()
        if self.init == "rtn":
            del args["init"], args["calibration_records"], args["calibration_seq_len"]
        elif self.init == "mse":
            del args["calibration_records"], args["calibration_seq_len"]
        return args

    def describe(self) -> dict[str, Any]:
        """As ``init_args``, plus the digest of the calibration tokens of a loaded ``gptq`` base."""
        described = super().describe()
        if self.init == "gptq" and self._calibration_digest is not None:
            described["calibration_digest"] = self._calibration_digest
        return described

    def expect_calibration(self, digest: str | None) -> None:
        """The calibration digest a checkpoint recorded: ``load`` then finds that base in the cache
        without reading the data, and refuses a base calibrated on other tokens."""
        self._calibration_digest = digest

    @staticmethod
    def _is_target(name: str) -> bool:
        # Like bitsandbytes: every linear layer but the output head (kept in high precision).
        return name.rsplit(".", 1)[-1] != "lm_head"

    def load(self, model_name_or_path: str, calibration: CalibrationSource | None = None) -> nn.Module:
        from qblora_pl.quantization.int_layer import quantize_linear_layers
        from qblora_pl.quantization import quantized_checkpoints as checkpoints

        dtype = resolve_dtype(self.compute_dtype)
        readers = {"compressed-tensors": (checkpoints.is_compressed_tensors_checkpoint, checkpoints.load_compressed_tensors_base),
                   "GPTQ": (checkpoints.is_gptq_checkpoint, checkpoints.load_gptq_base)}
        kind = next((k for k, (test, _) in readers.items() if test(model_name_or_path)), None)
        if kind is not None:
            # Already quantized (llm-compressor, AutoGPTQ / GPTQModel, our compressed-tensors export): its codes,
            # scales and zero points become the base as they are (quantized_checkpoints.py); nothing to calibrate.
            if self.init != "rtn":
                raise ValueError(f"GroupwiseInt(init={self.init!r}) quantizes float weights, but {model_name_or_path} is "
                                 f"an already quantized {kind} checkpoint, loaded as it is: leave init at 'rtn'")
            model = readers[kind][1](model_name_or_path, self.bits, self.group_size)
            model.requires_grad_(False)
            if torch.cuda.is_available():
                model.to(torch.device("cuda", torch.cuda.current_device()))
            cast_float_modules(model, dtype)
            return model
        # Quantize from the float32 weights so the rounding is not done on bf16 values.
        model = self._load_float(model_name_or_path, torch.float32)
        model.requires_grad_(False)
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        if self.init == "gptq":
            self._load_gptq(model, model_name_or_path, calibration, device)
        elif self.init == "mse" and self._load_cached(model, model_name_or_path, None):
            model.to(device)
        else:
            model.to(device)
            quantize_linear_layers(model, self._is_target, bits=self.bits, group_size=self.group_size,
                                   scale_dtype=resolve_dtype(self.scale_dtype),
                                   params="mse" if self.init == "mse" else "minmax", progress=self.init == "mse")
            if self.init == "mse":
                self._save_cached(model, model_name_or_path, None, {})
        cast_float_modules(model, dtype)
        return model

    # -- calibrated bases --------------------------------------------------------------------

    def _cache_key(self, model_name_or_path: str, digest: str | None) -> dict[str, Any]:
        from qblora_pl.quantization.base_cache import source_fingerprint

        key = {"source": source_fingerprint(model_name_or_path), "bits": self.bits, "group_size": self.group_size,
               "scale_dtype": self.scale_dtype, "init": self.init, "targets": "all linear layers but lm_head"}
        if self.init == "gptq":
            key.update(calibration_records=self.calibration_records, calibration_seq_len=self.calibration_seq_len,
                       calibration_digest=digest, damping=self.GPTQ_DAMPING)
        return key

    def _load_cached(self, model: nn.Module, model_name_or_path: str, digest: str | None) -> bool:
        from qblora_pl.quantization.base_cache import base_cache_dir, load_cached_base

        directory = base_cache_dir(self._cache_key(model_name_or_path, digest))
        record = load_cached_base(model, directory)
        if record is not None:
            rank_zero_info(f"GroupwiseInt(init={self.init!r}): the quantized base from the cache {directory}")
        return record is not None

    def _save_cached(self, model: nn.Module, model_name_or_path: str, digest: str | None, info: dict[str, Any]) -> None:
        from qblora_pl.quantization.base_cache import base_cache_dir, save_base

        key = self._cache_key(model_name_or_path, digest)
        directory = base_cache_dir(key)
        try:
            save_base(model, directory, key, info)
        except OSError as err:  # a read-only cache costs time on the next run, not this run
            rank_zero_warn(f"GroupwiseInt: could not cache the quantized base in {directory} ({err}); the next run "
                           "quantizes again")

    def _load_gptq(self, model: nn.Module, model_name_or_path: str, calibration: CalibrationSource | None,
                   device: torch.device) -> None:
        from qblora_pl.quantization.calibration import quantize_model_gptq
        from qblora_pl.quantization.int_layer import GroupwiseIntLinear
        from qblora_pl.quantization.int_quantizer import GroupwiseIntQuantizer

        expected = self._calibration_digest
        if expected is not None and self._load_cached(model, model_name_or_path, expected):
            model.to(device)
            return
        if calibration is None:
            raise ValueError(
                "GroupwiseInt(init='gptq') calibrates on the run's training examples, and none were given"
                + (f" (the checkpoint's base was calibrated on tokens with digest {expected}, not in the cache)"
                   if expected else "")
                + ": run it with the data module (main.py fit / test), or pass the run's data (main.py export "
                  "--data_path)"
            )
        calibration_set = calibration(self.calibration_records, self.calibration_seq_len)
        digest = calibration_set.digest
        if expected is not None and digest != expected:
            raise ValueError(
                f"GroupwiseInt(init='gptq'): the checkpoint's base was calibrated on tokens with digest {expected}, "
                f"but this run's calibration set is {calibration_set.describe()}: another base. Use the run's own "
                "data (data_path, split, template and tokenizer) or calibration_records / calibration_seq_len"
            )
        self._calibration_digest = digest
        if self._load_cached(model, model_name_or_path, digest):
            model.to(device)
            return
        rank_zero_info(f"GroupwiseInt(init='gptq'): calibrating INT{self.bits} g{self.group_size} on "
                       f"{calibration_set.describe()}")
        scale_dtype = resolve_dtype(self.scale_dtype)
        summary = quantize_model_gptq(
            model,
            is_target=self._is_target,
            make_layer=lambda linear, q: GroupwiseIntLinear.from_quantized(linear, q, self.bits, self.group_size,
                                                                             scale_dtype),
            quantizer=GroupwiseIntQuantizer(self.bits, self.group_size),
            calibration=calibration_set,
            device=device,
            param_dtype=scale_dtype,
            damp=self.GPTQ_DAMPING,
            progress=_is_rank_zero(),
        )
        leftover = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and self._is_target(n)]
        if leftover:  # linears outside the decoder layers (none in a Llama): the data-free search
            from qblora_pl.quantization.int_layer import quantize_linear_layers

            quantize_linear_layers(model, set(leftover).__contains__, bits=self.bits, group_size=self.group_size,
                                   scale_dtype=scale_dtype, params="mse")
        model.to(device)
        rank_zero_info(f"GroupwiseInt(init='gptq'): {len(summary['layers'])} layers in {summary['seconds']:.0f} s")
        self._save_cached(model, model_name_or_path, digest,
                          {"seconds": summary["seconds"], "calibration": summary["calibration"]})


def _is_rank_zero() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


class NoQuantization(QuantizationBackend):
    """A dense 16/32-bit base (LoRA without quantization; a reference for tests and benchmarks).

    Args:
        compute_dtype: ``"auto"`` = bf16 on CUDA, fp32 on CPU.
    """

    name = "dense"

    def __init__(self, compute_dtype: DTypeName = "auto") -> None:
        self.compute_dtype = compute_dtype

    def load(self, model_name_or_path: str, calibration: CalibrationSource | None = None) -> nn.Module:
        model = self._load_float(model_name_or_path, resolve_dtype(self.compute_dtype))
        model.requires_grad_(False)
        return model.cuda() if torch.cuda.is_available() else model
