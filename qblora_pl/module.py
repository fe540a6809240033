"""The LightningModule: a frozen, quantized causal LM with a swappable adapter strategy."""

from __future__ import annotations

import math
import time
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info

from qblora_pl.adapters.base import AdapterStrategy
from qblora_pl.adapters.injection import (
    LLAMA_TARGET_MODULES,
    adapted_layers,
    adapter_summary_rows,
    count_parameters,
    format_table,
    inject_adapters,
)
from qblora_pl.adapters.lora import LoRA
from qblora_pl.export.native import is_native_export, load_native
from qblora_pl.paths import EMBEDDED_MODEL_DIR
from qblora_pl.quantization.backends import NF4, QuantizationBackend

ADAPTER_CHECKPOINT_FORMAT = 1


class AdapterCheckpointMismatch(RuntimeError):
    """An adapter checkpoint does not fit the model it is being loaded into."""


class QuantizedCausalLM(pl.LightningModule):
    """Fine-tunes a frozen, quantized causal LM through an adapter strategy.

    The base model is loaded and quantized in ``configure_model`` (so distributed strategies
    can shard it); only the adapters train, and checkpoints hold only the adapters, the
    optimizer and the loop state - never the frozen base.

    Args:
        model_name_or_path: a Hugging Face causal LM directory or hub name
            (e.g. ``meta-llama/Llama-2-7b-hf``). Default: the small Llama shipped in the package.
        quantization: how the frozen base is stored (``NF4``, ``GroupwiseInt``, ``NoQuantization``).
        adapter: the method (``LoRA``, ``QBLoRA``, ``QALoRA``, ``QABLoRA``).
        target_modules: last name components of the linear layers to adapt.
        learning_rate: peak learning rate (constant after warm-up, as in QLoRA).
        warmup_steps: linear warm-up steps from 0 to ``learning_rate``.
        weight_decay: AdamW weight decay.
        optimizer: ``auto`` (bitsandbytes paged AdamW on CUDA, torch AdamW elsewhere),
            ``adamw`` or ``paged_adamw``.
        gradient_checkpointing: recompute activations in the backward pass to save memory.
    """

    def __init__(
        self,
        model_name_or_path: str = str(EMBEDDED_MODEL_DIR),
        quantization: QuantizationBackend | None = None,
        adapter: AdapterStrategy | None = None,
        target_modules: list[str] = list(LLAMA_TARGET_MODULES),
        learning_rate: float = 2e-4,
        warmup_steps: int = 10,
        weight_decay: float = 0.0,
        optimizer: Literal["auto", "adamw", "paged_adamw"] = "auto",
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if learning_rate <= 0 or not math.isfinite(learning_rate):
            raise ValueError(f"learning_rate={learning_rate} must be a positive finite number")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps={warmup_steps} must be >= 0")
        # Hyper-parameters stay plain data (checkpoints load with weights_only=True): the
        # strategy and backend objects are recorded by their class and arguments.
        self.save_hyperparameters(ignore=["quantization", "adapter"])
        self.model_name_or_path = model_name_or_path
        self.quantization = quantization if quantization is not None else NF4()
        self.adapter = adapter if adapter is not None else LoRA()
        # As class_path / init_args, so that `main.py test --ckpt_path` (LightningCLI restores a
        # checkpoint's hyper-parameters as model arguments) rebuilds the same strategy and base.
        self.hparams["quantization"] = class_path_config(self.quantization, self.quantization.init_args())
        self.hparams["adapter"] = class_path_config(self.adapter, self.adapter.hparams())
        self.target_modules = list(target_modules)
        self.model: torch.nn.Module | None = None
        # Checkpoints hold adapters only, so the frozen base's keys are absent by design;
        # on_load_checkpoint checks the adapter keys and shapes itself.
        self.strict_loading = False
        self._step_started_at: float | None = None

    # ------------------------------------------------------------------ model
    def configure_model(self) -> None:
        if self.model is not None:
            self._shard_if_distributed()
            return
        if is_native_export(self.model_name_or_path):
            self.model = self._load_native_export()
            return
        rank_zero_info(f"Loading {self.model_name_or_path} with {self.quantization.describe()}")
        model = self.quantization.load(self.model_name_or_path)
        layers = inject_adapters(model, self.adapter, self.target_modules)
        if self.hparams.gradient_checkpointing:
            model.config.use_cache = False
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()  # from_pretrained returns eval mode; Lightning switches modes per stage
        self.model = model
        trainable, total = count_parameters(model)
        rank_zero_info(
            f"Adapter {self.adapter!r} on {len(layers)} layers\n"
            + format_table(adapter_summary_rows(layers))
            + f"\ntrainable params: {trainable:,} | total params: {total:,} | "
            f"trainable%: {100 * trainable / max(total, 1):.4f}"
        )
        self._shard_if_distributed()

    def _shard_if_distributed(self) -> None:
        """Under ModelParallelStrategy (configs/fsdp.yaml) apply FSDP2 to the base and adapters."""
        from qblora_pl.distributed import check_strategy, is_sharded, shard_model

        strategy = self._trainer.strategy if self._trainer is not None else None
        check_strategy(strategy)
        if self.device_mesh is not None and not is_sharded(self.model):
            shard_model(self.model, self.device_mesh, getattr(strategy, "reshard_after_forward", True))

    def _load_native_export(self) -> torch.nn.Module:
        """A merged native low-bit export (MergeExport's ``native`` dir), for test / predict only.

        The adapters are already folded into it, so none are injected and the ``quantization`` /
        ``adapter`` settings are not used; fitting it or loading an adapter checkpoint is an error.
        """
        if self._trainer is not None and self._trainer.state.fn == "fit":
            raise ValueError(f"model_name_or_path {self.model_name_or_path!r} is a merged native export "
                             "(qblora_config.json): it has no adapters to train; fit from the base model")
        rank_zero_info(f"Loading the merged native export {self.model_name_or_path} (no adapters injected)")
        model = load_native(self.model_name_or_path)
        for param in model.parameters():
            param.requires_grad_(False)
        return model

    def adapted_layers(self):
        return adapted_layers(self.model)

    def forward(self, input_ids, attention_mask=None, labels=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)

    # ------------------------------------------------------------------ steps
    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self(batch["input_ids"], batch.get("attention_mask"), batch["labels"]).loss

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._step_started_at = time.perf_counter()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        distributed = self._trainer is not None and self.trainer.world_size > 1
        loss = self._global_token_mean_loss(batch) if distributed else self._loss(batch)
        if not _finite_everywhere(loss, distributed):
            raise FloatingPointError(
                f"training loss is {loss.item()} at global step {self.global_step} (batch {batch_idx}); "
                f"no optimizer step was taken with it. Lower model.learning_rate "
                f"(now {self.hparams.learning_rate}) or check the data; resume from the last "
                f"checkpoint with --ckpt_path."
            )
        batch_size = batch["input_ids"].size(0)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size, sync_dist=distributed)
        return loss

    def _global_token_mean_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """This rank's share of the loss averaged over the response tokens of the *global* batch.

        Each rank returns ``sum of its token losses / (global tokens / world size)``; the data-
        parallel gradient average then equals the gradient of the one-device loss on the same
        global batch, whatever the ranks' token counts (docs/fsdp.md, loss parity).
        """
        from qblora_pl.distributed import global_token_count

        n_local = (batch["labels"][:, 1:] != -100).sum()
        per_rank = global_token_count(n_local).float() / self.trainer.world_size
        return self.model(
            input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=batch["labels"],
            num_items_in_batch=per_rank,
        ).loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._step_started_at is None:
            return
        elapsed = time.perf_counter() - self._step_started_at
        tokens = batch["attention_mask"].sum() if "attention_mask" in batch else batch["input_ids"].numel()
        self.log("train/tokens_per_s", float(tokens) / max(elapsed, 1e-9), batch_size=batch["input_ids"].size(0))

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._log_eval_loss("val", batch)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._log_eval_loss("test", batch)

    def _log_eval_loss(self, stage: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        loss = self._loss(batch)
        # Weight by response tokens so the epoch value is the per-token loss of the split.
        n_tokens = int((batch["labels"][:, 1:] != -100).sum())
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=max(n_tokens, 1), sync_dist=True)
        return loss

    def on_validation_epoch_end(self) -> None:
        self._log_perplexity("val")

    def on_test_epoch_end(self) -> None:
        self._log_perplexity("test")

    def _log_perplexity(self, stage: str) -> None:
        loss = self.trainer.callback_metrics.get(f"{stage}/loss")
        if loss is not None:
            self.log(f"{stage}/ppl", torch.exp(loss.detach().float()), sync_dist=True)

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int, max_new_tokens: int = 64) -> list[str]:
        """Greedy responses for each record's prompt (the tokens before its response)."""
        from qblora_pl.generation import generate_responses

        return generate_responses(self.model, batch, self.trainer.datamodule.tokenizer, max_new_tokens)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise RuntimeError("no trainable parameters: the adapter strategy created none")
        choice = self.hparams.optimizer
        sharded = self.device_mesh is not None
        if sharded and choice == "paged_adamw":
            raise ValueError(
                "model.optimizer=paged_adamw: bitsandbytes' paged AdamW cannot step FSDP2's sharded "
                "(DTensor) adapters; use optimizer: auto or adamw (torch AdamW) under FSDP"
            )
        use_paged = choice == "paged_adamw" or (choice == "auto" and torch.cuda.is_available() and not sharded)
        kwargs = dict(lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay)
        if use_paged:
            import bitsandbytes as bnb

            optimizer = bnb.optim.PagedAdamW32bit(params, **kwargs)
        else:
            optimizer = torch.optim.AdamW(params, **kwargs)
        warmup = self.hparams.warmup_steps
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / (warmup + 1)) if warmup else 1.0
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # ------------------------------------------------------------------ checkpoints
    def adapter_spec(self) -> dict[str, Any]:
        """What an adapter checkpoint must match: method, hyper-parameters, base, shapes."""
        return {
            "format": ADAPTER_CHECKPOINT_FORMAT,
            "strategy": f"{type(self.adapter).__module__}.{type(self.adapter).__qualname__}",
            "strategy_hparams": self.adapter.hparams(),
            "quantization": self.quantization.describe(),
            "model_name_or_path": self.model_name_or_path,
            "layers": {name: layer.adapter.shapes() for name, layer in self.adapted_layers().items()},
        }

    def trainable_names(self) -> set[str]:
        """State-dict keys of the parameters that train (the adapters)."""
        return {n for n, p in self.named_parameters() if p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        for layer in self.adapted_layers().values():
            if layer.merged:
                raise RuntimeError("refusing to checkpoint a merged model; unmerge() first")
        trainable = self.trainable_names()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["adapter_spec"] = self.adapter_spec()
        checkpoint["world_size"] = self.trainer.world_size if self._trainer is not None else 1  # informative
        checkpoint["rng_states"] = {"torch": torch.get_rng_state()}
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
        rng = checkpoint.get("rng_states", {})
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])


def _finite_everywhere(loss: torch.Tensor, distributed: bool) -> bool:
    """Whether the loss is finite on every rank (one rank stopping alone would hang the others)."""
    bad = (~torch.isfinite(loss.detach())).sum()
    if distributed:
        from qblora_pl.distributed import global_token_count

        bad = global_token_count(bad)
    return int(bad) == 0


def class_path_config(obj: Any, init_args: dict[str, Any]) -> dict[str, Any]:
    """``{"class_path": ..., "init_args": ...}``: how jsonargparse (and YAML configs) name an object."""
    return {"class_path": f"{type(obj).__module__}.{type(obj).__qualname__}", "init_args": dict(init_args)}


def check_adapter_spec(saved: dict, current: dict, saved_keys: set[str], current_keys: set[str]) -> None:
    """Raise AdapterCheckpointMismatch naming what differs; a mismatch never loads silently."""
    if saved["strategy"] != current["strategy"]:
        raise AdapterCheckpointMismatch(
            f"checkpoint adapter is {saved['strategy']} but the model uses {current['strategy']}"
        )
    if saved["quantization"] != current["quantization"]:
        raise AdapterCheckpointMismatch(
            f"checkpoint was trained on base {saved['quantization']} but the model's base is {current['quantization']}"
        )
    for name, shapes in current["layers"].items():
        if saved["layers"].get(name) != shapes:
            raise AdapterCheckpointMismatch(
                f"layer {name}: checkpoint adapter shapes {saved['layers'].get(name)} != model's {shapes}"
            )
    if saved_keys != current_keys:
        extra, missing = sorted(saved_keys - current_keys)[:5], sorted(current_keys - saved_keys)[:5]
        raise AdapterCheckpointMismatch(f"adapter keys differ: unexpected {extra}, missing {missing}")
