"""Scale-out: FSDP2 with a sharded quantized base, on Lightning's own ``ModelParallelStrategy``.

Three pieces (docs/fsdp.md):

* :func:`shard_model` - what ``QuantizedCausalLM.configure_model`` calls when the trainer runs a
  device mesh: ``torch.distributed.fsdp.fully_shard`` on every decoder layer, then on the root.
  The group-wise INT-b base keeps its packed codes, scales and offsets as frozen parameters
  (:class:`~qblora_pl.quantization.int_layer.GroupwiseIntLinear`), so FSDP2 shards them:
  each rank holds ``1 / world_size`` of the frozen base. An NF4 base on torchao's ``NF4Tensor``
  (``NF4(implementation: torchao)``) is sharded the same way - codes, int8 scales and their factors
  - when its layers divide over the world size (checked first, naming the layer); bitsandbytes NF4
  is refused (see :class:`ShardingNotSupported`).
* :class:`FSDP2Strategy` - ``ModelParallelStrategy`` set up for pure data-parallel sharding
  (one mesh dimension over every rank, on any number of nodes) that writes the same
  single-file, adapter-only checkpoints as a one-device run and reads them back at any world
  size. ``data.batch_size`` is the global batch: each rank loads ``batch_size / world_size``.
* :func:`gather_adapter_state` / :func:`global_token_count` - helpers for the export and the
  loss normalisation that make a run on N ranks compute what a run on one rank computes.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

__all__ = [
    "FSDP2Strategy",
    "ShardingNotSupported",
    "shard_model",
    "check_strategy",
    "is_sharded",
    "gather_adapter_state",
    "unsharded_copy",
    "global_token_count",
    "base_weight_bytes",
]


class ShardingNotSupported(ValueError):
    """The model or strategy cannot be sharded with FSDP2 as configured."""


def is_sharded(module: nn.Module) -> bool:
    """True when any parameter of ``module`` is a DTensor (FSDP2 has sharded it)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def check_strategy(strategy) -> None:
    """Refuse strategies whose sharding this project does not implement, naming the fix.

    Lightning's ``FSDPStrategy`` (FSDP1) would wrap the model itself, with flat parameters that
    mix the uint8 codes, fp16 scales and fp32 adapters and a full state dict gathered at every
    checkpoint; it needs CUDA anyway (Lightning says so for ``accelerator=cpu``).
    """
    if strategy is None:
        return
    from lightning.pytorch.strategies import FSDPStrategy

    if isinstance(strategy, FSDPStrategy):
        raise ShardingNotSupported(
            f"trainer.strategy={type(strategy).__name__} (FSDP1) is not supported; qblora_pl shards with "
            f"FSDP2: --config configs/fsdp.yaml (qblora_pl.distributed.FSDP2Strategy), which runs on "
            f"accelerator={type(strategy.accelerator).__name__ if strategy.accelerator else 'cuda'} too"
        )


def data_parallel_mesh(device_mesh):
    """The 1-D mesh to shard over; refuses tensor parallelism, which this project does not implement."""
    names = device_mesh.mesh_dim_names or ()
    if "tensor_parallel" in names and device_mesh["tensor_parallel"].size() > 1:
        dp = device_mesh["data_parallel"].size() if "data_parallel" in names else 1
        raise ShardingNotSupported(
            f"the device mesh has tensor_parallel_size={device_mesh['tensor_parallel'].size()} and "
            f"data_parallel_size={dp}; qblora_pl shards with FSDP2 only (no tensor parallelism). Use "
            f"trainer.strategy: qblora_pl.distributed.FSDP2Strategy (configs/fsdp.yaml), or "
            f"ModelParallelStrategy(data_parallel_size=<world size>, tensor_parallel_size=1)."
        )
    return device_mesh["data_parallel"] if "data_parallel" in names else device_mesh


def shard_model(model: nn.Module, device_mesh, reshard_after_forward: bool = True) -> int:
    """Apply FSDP2 to a loaded, adapter-injected Hugging Face causal LM, in place.

    ``fully_shard`` on each decoder layer (``model._no_split_modules``, e.g. ``LlamaDecoderLayer``)
    so only one layer's base is gathered at a time, then on the root for the embeddings, final
    norm and head. Frozen parameters (the INT-b base) and trainable ones (the adapters) share a
    layer's group: FSDP2 all-gathers mixed dtypes through one byte buffer and reduce-scatters
    only the adapters' fp32 gradients. Returns the number of decoder layers sharded.
    """
    from torch.distributed.fsdp import fully_shard

    from qblora_pl.quantization.base_layers import is_nf4_linear

    nf4 = [name for name, m in model.named_modules() if is_nf4_linear(m)]
    if nf4:
        raise ShardingNotSupported(
            f"layer {nf4[0]} (and {len(nf4) - 1} more) is a bitsandbytes 4-bit layer, which FSDP2 "
            f"cannot shard safely: the quantization state lives outside the tensor FSDP2 shards, and "
            f"uint8 storage is known to train with zero loss and NaN gradients (accelerate issue "
            f"#3983). Under FSDP use NF4 on torchao (--model.quantization.init_args.implementation torchao, "
            f"pip install 'qblora-pl[fsdp-nf4]') or the group-wise integer base, e.g. "
            f"--model.quantization qblora_pl.quantization.GroupwiseInt (LoRA and Q-BLoRA work on both)."
        )
    mesh = data_parallel_mesh(device_mesh)
    check_nf4_shards(model, mesh.size())
    if mesh.size() == 1 and any(type(m).__name__ == "TorchaoNF4Linear" for m in model.modules()):
        # One rank has nothing to shard, and FSDP2's one-rank all-gather hands torchao's NF4Tensor
        # one buffer where its fsdp_post_all_gather unpacks three (torchao 0.18, torch 2.13): the
        # model stays unsharded and computes exactly what it would sharded.
        return 0
    layer_classes = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in layer_classes]
    if not layers:
        raise ShardingNotSupported(
            f"{type(model).__name__} names no decoder-layer class in _no_split_modules "
            f"({sorted(layer_classes)}); cannot choose the FSDP2 units"
        )
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return len(layers)


def check_nf4_shards(model: nn.Module, world_size: int) -> None:
    """Refuse, naming the layer and the fix, a torchao NF4 base that ``world_size`` ranks cannot shard.

    FSDP2 splits each ``NF4Tensor`` into ``world_size`` row blocks, splitting its codes, int8 block
    scales and double-quantization factors alike: rows and factors must divide by the world size
    (:func:`qblora_pl.quantization.torchao_nf4.shard_problem`). Checked before any layer is sharded.
    """
    from qblora_pl.quantization.torchao_nf4 import TorchaoNF4Linear, shard_problem

    problems = [(name, problem) for name, m in model.named_modules()
                if isinstance(m, TorchaoNF4Linear) and (problem := shard_problem(name, m, world_size))]
    if problems:
        more = f" ({len(problems) - 1} more layer(s) cannot either)" if len(problems) > 1 else ""
        raise ShardingNotSupported(problems[0][1] + more)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on the CPU; a collective for DTensors (every rank must call it)."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        tensor = tensor.full_tensor()
    return tensor.detach().cpu()


def gather_adapter_state(module: nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
    """Full (unsharded) CPU copies of ``module``'s trainable parameters, by state-dict key.

    A collective when the module is sharded: every rank calls it, in the same parameter order;
    ranks with ``keep=False`` get an empty dict. Only the adapters travel - never the base.
    """
    state = {}
    for name, param in module.named_parameters():
        if param.requires_grad:
            full = _full(param)
            if keep:
                state[name] = full
    return state


def unsharded_copy(module, keep: bool = True):
    """An unsharded twin of a sharded ``QuantizedCausalLM``, on the ranks with ``keep`` (else None).

    A collective (every rank gathers the adapters); the twin re-loads and re-quantizes the base
    from ``model_name_or_path`` - deterministic, and the frozen base never changes in training -
    and takes the gathered adapters and any QAT fake quantizers. Used by the export at the end
    of an FSDP fit, so the exported low-bit model is the one a one-device run would write.
    """
    from qblora_pl.adapters.injection import adapted_layers

    state = gather_adapter_state(module, keep=keep)
    if not keep:
        return None
    twin = type(module)(
        model_name_or_path=module.model_name_or_path,
        quantization=module.quantization,
        adapter=module.adapter,
        target_modules=module.target_modules,
    )
    twin.configure_model()
    result = twin.load_state_dict(state, strict=False)
    if result.unexpected_keys or set(state) != twin.trainable_names():
        raise RuntimeError(f"unsharded copy: adapter keys differ ({result.unexpected_keys[:5]})")
    sharded_layers = adapted_layers(module.model)
    for name, layer in adapted_layers(twin.model).items():
        layer.fake_quant = sharded_layers[name].fake_quant
    twin.train(module.training)
    return twin


def global_token_count(n_local: torch.Tensor) -> torch.Tensor:
    """Sum of ``n_local`` over all ranks (itself when not distributed)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return n_local
    total = n_local.detach().clone()
    dist.all_reduce(total)
    return total


def base_weight_bytes(module: nn.Module) -> int:
    """Bytes this rank holds of the frozen parameters (its local shards under FSDP2).

    Excludes FSDP2's padding of uneven shards (at most ``world_size - 1`` rows per tensor). A torchao
    ``NF4Tensor`` counts the bytes it stores (codes, scales, factors), not the float tensor it
    stands for.
    """
    from torch.distributed.tensor import DTensor

    from qblora_pl.quantization.torchao_nf4 import is_nf4_tensor, nf4_storage_bytes

    total = 0
    for param in module.parameters():
        if param.requires_grad:
            continue
        local = param.to_local() if isinstance(param, DTensor) else param
        total += nf4_storage_bytes(local) if is_nf4_tensor(local) else local.numel() * local.element_size()
    return total


def _load_full_into(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full tensor into a (possibly sharded) parameter: each rank keeps its own shard."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if tuple(param.shape) != tuple(full.shape):
        raise ValueError(f"shape {tuple(full.shape)} does not fit a parameter of shape {tuple(param.shape)}")
    with torch.no_grad():
        if isinstance(param, DTensor):
            shard = distribute_tensor(full.to(param.dtype), param.device_mesh, param.placements, src_data_rank=None)
            param.to_local().copy_(shard.to_local())
        else:
            param.copy_(full.to(param.dtype))


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` (FSDP2) as pure sharded data parallelism.

    * The mesh is one data-parallel dimension over every rank of every node
      (``tensor_parallel_size=1``): the base is sharded over all ``num_nodes x devices`` ranks and
      each rank reads a distinct part of every global batch.
    * ``data.batch_size`` is the **global** batch (``split_batch=True``): each rank loads
      ``batch_size / world_size`` examples, so the optimisation - batch, steps, learning rate -
      does not change with the number of devices. A batch the world size does not divide is
      refused with both numbers.
    * Checkpoints are one consolidated file holding only the adapters (gathered from their
      shards), the optimizer state in ``torch.optim`` format, and the loop state - the same file a
      one-device run writes, loadable at any world size (resharded on load). Sharded
      distributed-checkpoint directories are not written: adapters are megabytes, and a single
      file keeps the checkpoint adapter-only, portable and exportable with ``main.py export``.

    Works on CUDA (NCCL) and on CPU (gloo, for tests). Launch is Lightning's own: ``--trainer.devices N``
    (and ``--trainer.num_nodes M`` under torchrun / SLURM).

    Args:
        split_batch: treat ``data.batch_size`` as the global batch (default) or as per device.
        reshard_after_forward: free each layer's gathered base after its forward (FSDP2's
            ``reshard_after_forward``; ``False`` keeps it until the backward: faster, more memory).
        process_group_backend: ``nccl`` / ``gloo``; default by device.
    """

    def __init__(
        self,
        split_batch: bool = True,
        reshard_after_forward: bool = True,
        process_group_backend: str | None = None,
    ) -> None:
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=False,
            process_group_backend=process_group_backend,
        )
        self.splits_global_batch = split_batch
        self.reshard_after_forward = reshard_after_forward

    def setup_environment(self) -> None:
        # One mesh dimension over all ranks; the parent's "auto" would give data_parallel=num_nodes.
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    # ------------------------------------------------------------------ checkpoints
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The adapters only, gathered whole on rank 0 (the base never leaves its shards)."""
        assert self.lightning_module is not None
        return gather_adapter_state(self.lightning_module, keep=self.global_rank == 0)

    def optimizer_state(self, optimizer) -> dict[str, Any]:
        """``optimizer.state_dict()`` with full tensors: the format a one-device run saves."""
        from lightning.pytorch.core.optimizer import LightningOptimizer

        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        local = optimizer.state_dict()
        keep = self.global_rank == 0
        state = {}
        for pid in sorted(local["state"]):  # the same order on every rank: the gathers pair up
            entry = {k: _full(v) if isinstance(v, torch.Tensor) else v for k, v in local["state"][pid].items()}
            if keep:
                state[pid] = entry
        return {"state": state, "param_groups": local["param_groups"]} if keep else {}

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        """Read a single-file adapter checkpoint and scatter it into this world size's shards."""
        path = Path(self.broadcast(checkpoint_path))
        if path.is_dir():
            raise ValueError(
                f"{path} is a directory (a sharded distributed checkpoint). {type(self).__name__} reads "
                f"and writes single-file adapter checkpoints (.ckpt), which load at any world size."
            )
        from qblora_pl.checkpoints import read_checkpoint

        checkpoint = read_checkpoint(path)
        module = self.lightning_module
        assert module is not None
        if "adapter_spec" in checkpoint and hasattr(module, "adapter_spec"):
            from qblora_pl.checkpoints import check_adapter_spec

            check_adapter_spec(
                checkpoint["adapter_spec"], module.adapter_spec(), set(checkpoint["state_dict"]), module.trainable_names()
            )
        params = dict(module.named_parameters())
        unknown = sorted(set(checkpoint["state_dict"]) - set(params))
        if unknown:
            raise KeyError(f"{path}: checkpoint keys not in the model: {unknown[:5]}")
        for name, full in checkpoint["state_dict"].items():
            _load_full_into(params[name], full)
        saved = checkpoint.get("optimizer_states", [])
        if len(saved) != len(self.optimizers):
            raise ValueError(f"{path} holds {len(saved)} optimizer states, the run has {len(self.optimizers)} optimizers")
        for optimizer, state in zip(self.optimizers, saved):
            load_full_optimizer_state(optimizer, state)
        return checkpoint


def load_full_optimizer_state(optimizer: torch.optim.Optimizer, state: Mapping[str, Any]) -> None:
    """Load a ``torch.optim`` state dict holding full tensors into an optimizer over sharded params."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    saved_ids = [i for group in state["param_groups"] for i in group["params"]]
    if len(saved_ids) != len(params):
        raise ValueError(f"optimizer state covers {len(saved_ids)} parameters, the optimizer has {len(params)}")
    converted = {}
    for pid, entry in state["state"].items():
        param = params[saved_ids.index(pid)]
        out = {}
        for key, value in entry.items():
            if isinstance(value, torch.Tensor) and isinstance(param, DTensor) and tuple(value.shape) == tuple(param.shape):
                value = distribute_tensor(value.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
            out[key] = value
        converted[pid] = out
    optimizer.load_state_dict({"state": converted, "param_groups": state["param_groups"]})
