"""The adapter-checkpoint hooks of :class:`~qblora_pl.module.QuantizedCausalLM` (a mixin of it).

What a checkpoint holds - the adapters only, never non-finite ones, with the ``adapter_spec`` they
must match, the RNG states and the batch-seed base - and what loading one checks and restores,
including a learning rate or weight decay changed on resume. The checkpoint format and its checks
are :mod:`qblora_pl.checkpoints`.
"""

from __future__ import annotations

import os
import random
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info

from qblora_pl.checkpoints import (
    ADAPTER_CHECKPOINT_FORMAT,
    AdapterCheckpointMismatch,
    NonFiniteAdapterError,
    base_fingerprint,
    check_adapter_spec,
    non_finite_entries,
)
from qblora_pl.quantization.native_checkpoint import is_native_export
from qblora_pl.paths import portable_model_reference


class AdapterCheckpointHooks:
    """``adapter_spec``, ``on_save_checkpoint`` / ``on_load_checkpoint`` and the resume helpers.

    Uses the module's ``adapter``, ``quantization``, ``model``, ``model_name_or_path``,
    ``hparams`` and its run state (``_diverged``, ``_farthest_from_uniform``,
    ``_batch_seed_base``, ``_run_seed``).
    """

    def adapter_spec(self) -> dict[str, Any]:
        """What an adapter checkpoint must match: method, hyper-parameters, base, shapes.

        ``model_name_or_path`` is recorded portably (``embedded:tiny-llama``) and is informative:
        another path to the same base is accepted, ``base`` (the base config's sizes) is checked.
        """
        spec = {
            "format": ADAPTER_CHECKPOINT_FORMAT,
            "strategy": f"{type(self.adapter).__module__}.{type(self.adapter).__qualname__}",
            "strategy_hparams": self.adapter.hparams(),
            "quantization": self.quantization.describe(),
            "model_name_or_path": portable_model_reference(self.model_name_or_path),
            "layers": {name: layer.adapter.shapes() for name, layer in self.adapted_layers().items()},
        }
        config = getattr(self.model, "config", None)
        if config is not None:
            spec["base"] = base_fingerprint(config)
        return spec

    def trainable_names(self) -> set[str]:
        """State-dict keys of the parameters that train (the adapters)."""
        return {n for n, p in self.named_parameters() if p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        for layer in self.adapted_layers().values():
            if layer.merged:
                raise RuntimeError("refusing to checkpoint a merged model; unmerge() first")
        trainable = self.trainable_names()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        # Never write diverged / non-finite adapters: they would replace a good last.ckpt.
        bad = non_finite_entries(checkpoint["state_dict"])
        if bad or self._diverged:
            raise NonFiniteAdapterError(
                f"refusing to write a checkpoint at global step {self.global_step}: "
                + (f"the adapters hold non-finite values ({', '.join(bad)})" if bad else self._diverged)
            )
        checkpoint["adapter_spec"] = self.adapter_spec()
        if "hyper_parameters" in checkpoint:
            checkpoint["hyper_parameters"]["model_name_or_path"] = portable_model_reference(self.model_name_or_path)
        checkpoint["world_size"] = self.trainer.world_size if self._trainer is not None else 1  # informative
        checkpoint["farthest_from_uniform_loss"] = self._farthest_from_uniform
        checkpoint["batch_seed_base"] = self._run_seed()
        # Dropout draws are re-seeded per batch (on_train_batch_start), so these only matter to
        # user code drawing from the global generators between batches.
        checkpoint["rng_states"] = {"torch": torch.get_rng_state(), "python": _python_rng_state()}
        if torch.cuda.is_available():
            checkpoint["rng_states"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if is_native_export(self.model_name_or_path):
            raise AdapterCheckpointMismatch(
                f"model_name_or_path {self.model_name_or_path!r} is a merged native export: its adapters are "
                "already folded in, so an adapter checkpoint cannot be loaded into it; drop --ckpt_path"
            )
        spec = checkpoint.get("adapter_spec")
        if spec is None:
            raise AdapterCheckpointMismatch("checkpoint has no adapter_spec: it was not written by qblora_pl")
        check_adapter_spec(spec, self.adapter_spec(), set(checkpoint["state_dict"]), self.trainable_names())
        bad = non_finite_entries(checkpoint["state_dict"])
        if bad:
            raise NonFiniteAdapterError(f"the checkpoint's adapters hold non-finite values: {', '.join(bad)}; "
                                        "use a checkpoint written before the run diverged")
        self._apply_changed_optimisation(checkpoint)
        self._farthest_from_uniform = max(self._farthest_from_uniform, float(checkpoint.get("farthest_from_uniform_loss", 0.0)))
        rng = checkpoint.get("rng_states", {})
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        if "python" in rng:
            _set_python_rng_state(rng["python"])
        if "batch_seed_base" in checkpoint:
            self._batch_seed_base = self._resumed_seed(int(checkpoint["batch_seed_base"]), int(checkpoint.get("global_step", 0)))

    def _resumed_seed(self, saved: int, step: int) -> int:
        """The seed of the resumed run's dropout draws: the checkpoint's, unless ``seed_everything`` changed.

        With the same seed the resumed run draws exactly the masks the uninterrupted run would have.
        A different ``seed_everything`` (recorded in the run's config.yaml) takes effect from the
        resume point on, and is said; the data order is set by ``data.split_seed`` /
        ``data.shuffle_seed``, not by this seed.
        """
        current = os.environ.get("PL_GLOBAL_SEED")
        if current is None or int(current) == saved:
            return saved
        rank_zero_info(f"Resume: seed_everything={current} replaces the checkpoint's {saved}: the dropout draws from "
                       f"global step {step} on follow seed {current} (the data order follows data.split_seed / "
                       "data.shuffle_seed, unchanged)")
        return int(current)

    def _apply_changed_optimisation(self, checkpoint: dict[str, Any]) -> None:
        """Make a learning rate / weight decay changed on resume take effect, and say so.

        The optimizer and scheduler states saved in the checkpoint carry the old values (AdamW's
        ``lr``, LambdaLR's ``base_lrs``); loading them as they are would silently keep the old
        learning rate. They are rewritten here with the configured values before Lightning loads them.
        """
        saved = checkpoint.get("hyper_parameters") or {}
        changes = {}
        for key in ("learning_rate", "weight_decay"):
            old, new = saved.get(key), self.hparams.get(key)
            if old is not None and new is not None and float(old) != float(new):
                changes[key] = (old, new)
        for key in ("warmup_steps", "gradient_checkpointing", "optimizer", "divergence_patience"):
            if key in saved and saved[key] != self.hparams.get(key):
                rank_zero_info(f"Resume: model.{key} changed from {saved[key]!r} (checkpoint) to {self.hparams.get(key)!r}")
        if not changes:
            return
        lr, wd = self.hparams.learning_rate, self.hparams.weight_decay
        for state in checkpoint.get("optimizer_states", []):
            for group in state.get("param_groups", []):
                if "learning_rate" in changes:
                    group["initial_lr"] = lr
                    if "lr" in group and saved.get("learning_rate"):
                        group["lr"] = group["lr"] * lr / float(saved["learning_rate"])  # keeps the warm-up factor
                if "weight_decay" in changes and "weight_decay" in group:
                    group["weight_decay"] = wd
        if "learning_rate" in changes:
            for sched in checkpoint.get("lr_schedulers", []):
                if "base_lrs" in sched:
                    sched["base_lrs"] = [lr for _ in sched["base_lrs"]]
                if "_last_lr" in sched and saved.get("learning_rate"):
                    sched["_last_lr"] = [v * lr / float(saved["learning_rate"]) for v in sched["_last_lr"]]
        for key, (old, new) in changes.items():
            rank_zero_info(f"Resume: model.{key} changed from {old} (checkpoint) to {new}; "
                           "the restored optimizer and scheduler use the new value")


def _python_rng_state() -> dict[str, Any]:
    """Python's and numpy's global RNG states as plain data (checkpoints load with weights_only=True)."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {"random": [version, list(internal), gauss]}
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]
    except ImportError:
        pass
    return state


def _set_python_rng_state(state: dict[str, Any]) -> None:
    if "random" in state:
        version, internal, gauss = state["random"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
