"""The LightningModule: a frozen, quantized causal LM with a swappable adapter strategy."""

from __future__ import annotations

import math
import os
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
from qblora_pl.checkpoint_hooks import AdapterCheckpointHooks
from qblora_pl.quantization.native_checkpoint import is_native_export, load_native
from qblora_pl.checkpoints import NonFiniteAdapterError, non_finite_entries
from qblora_pl.paths import EMBEDDED_MODEL, portable_model_reference, resolve_model_reference
from qblora_pl.quantization.backends import NF4, QuantizationBackend


class TrainingDiverged(FloatingPointError):
    """The training loss sits at ln(vocab_size): the model predicts the uniform distribution."""


class QuantizedCausalLM(AdapterCheckpointHooks, pl.LightningModule):
    """Fine-tunes a frozen, quantized causal LM through an adapter strategy.

    The base model is loaded and quantized in ``configure_model`` (so distributed strategies
    can shard it); only the adapters train, and checkpoints hold only the adapters, the
    optimizer and the loop state - never the frozen base (the checkpoint hooks:
    :class:`~qblora_pl.checkpoint_hooks.AdapterCheckpointHooks`).

    Args:
        model_name_or_path: a Hugging Face causal LM directory, a ``.gguf`` file or a hub name
            (e.g. ``meta-llama/Llama-2-7b-hf``). Default: ``embedded:tiny-llama``, the small Llama
            shipped in the package (checkpoints record it by that name, not by its path).
        quantization: how the frozen base is stored (``NF4``, ``GroupwiseInt``, ``NoQuantization``).
        adapter: the method (``LoRA``, ``QBLoRA``, ``QALoRA``, ``QABLoRA``).
        target_modules: last name components of the linear layers to adapt.
        learning_rate: peak learning rate (constant after warm-up, as in QLoRA).
        warmup_steps: linear warm-up steps from 0 to ``learning_rate``.
        weight_decay: AdamW weight decay.
        optimizer: ``auto`` (bitsandbytes paged AdamW on CUDA, torch AdamW elsewhere),
            ``adamw`` or ``paged_adamw``.
        gradient_checkpointing: recompute activations in the backward pass to save memory.
        divergence_patience: stop with :class:`TrainingDiverged` when the training loss has sat at
            ``ln(vocab_size)`` (the loss of a uniform prediction: the model has diverged and
            predicts nothing) for this many steps in a row; 0 disables the check.
    """

    def __init__(
        self,
        model_name_or_path: str = EMBEDDED_MODEL,
        quantization: QuantizationBackend | None = None,
        adapter: AdapterStrategy | None = None,
        target_modules: list[str] = list(LLAMA_TARGET_MODULES),
        learning_rate: float = 2e-4,
        warmup_steps: int = 10,
        weight_decay: float = 0.0,
        optimizer: Literal["auto", "adamw", "paged_adamw"] = "auto",
        gradient_checkpointing: bool = False,
        divergence_patience: int = 10,
    ) -> None:
        super().__init__()
        if learning_rate <= 0 or not math.isfinite(learning_rate):
            raise ValueError(f"learning_rate={learning_rate} must be a positive finite number")
        if learning_rate * 10 >= torch.finfo(torch.float32).max:
            # AdamW's first step moves by learning_rate / (1 - beta1) = 10 x it, computed in float32.
            raise ValueError(f"learning_rate={learning_rate} is too large: AdamW's first step uses 10 x it, which must "
                             f"stay below float32's maximum {torch.finfo(torch.float32).max:.3g}; use a value below "
                             f"{torch.finfo(torch.float32).max / 10:.3g} (QLoRA uses 2e-4)")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps={warmup_steps} must be >= 0")
        if divergence_patience < 0:
            raise ValueError(f"divergence_patience={divergence_patience} must be >= 0 (0 disables the check)")
        # Hyper-parameters stay plain data (checkpoints load with weights_only=True): the
        # strategy and backend objects are recorded by their class and arguments.
        self.save_hyperparameters(ignore=["quantization", "adapter"])
        # Loaded from this installation's path; recorded portably (embedded:tiny-llama), so a
        # checkpoint of the embedded model still loads after the checkout moves.
        self.model_name_or_path = resolve_model_reference(model_name_or_path)
        self.hparams["model_name_or_path"] = portable_model_reference(model_name_or_path)
        self.quantization = quantization if quantization is not None else NF4()
        self.adapter = adapter if adapter is not None else LoRA()
        # As class_path / init_args, so that `main.py test --ckpt_path` (LightningCLI restores a
        # checkpoint's hyper-parameters as model arguments) rebuilds the same strategy and base.
        self.hparams["quantization"] = class_path_config(self.quantization, self.quantization.init_args())
        self.hparams["adapter"] = class_path_config(self.adapter, self.adapter.hparams())
        self.target_modules = list(target_modules)
        self.model: torch.nn.Module | None = None
        #: ``(records, seq_len) -> CalibrationSet`` for a calibrating base when there is no trainer data module.
        self.calibration_source = None
        # Checkpoints hold adapters only, so the frozen base's keys are absent by design;
        # on_load_checkpoint checks the adapter keys and shapes itself.
        self.strict_loading = False
        self._step_started_at: float | None = None
        self._uniform_loss_steps = 0  # consecutive steps with the loss at ln(vocab_size)
        self._farthest_from_uniform = 0.0  # largest |loss - ln V| / ln V seen so far (checkpointed)
        self._batch_seed_base: int | None = None  # see _run_seed (checkpointed)
        self._diverged: str | None = None  # why the adapters must not be checkpointed any more
        self._uniform_batches: dict[str, bool] = {}  # stage -> every batch so far predicted uniformly

    # ------------------------------------------------------------------ model
    def configure_model(self) -> None:
        if self.model is not None:
            self._shard_if_distributed()
            return
        if is_native_export(self.model_name_or_path):
            self.model = self._load_native_export()
            return
        rank_zero_info(f"Loading {self.model_name_or_path} with {self.quantization.describe()}")
        model = self.quantization.load(self.model_name_or_path, calibration=self._calibration_source())
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

    def _calibration_source(self):
        """Where a calibrating base (``GroupwiseInt(init='gptq')``) gets its tokens: ``calibration_source``
        if set (exports and benchmarks set it), else the trainer's data module (the run's training split)."""
        if self.calibration_source is not None:
            return self.calibration_source
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        return getattr(datamodule, "calibration_set", None)

    def setup(self, stage: str) -> None:
        if stage == "fit" and self._trainer is not None:
            self._check_batch_fits_data()

    def _check_batch_fits_data(self) -> None:
        """Refuse a batch larger than the training set before a step (it would be one giant batch)."""
        datamodule = self.trainer.datamodule
        batch_size = getattr(datamodule, "batch_size", None)
        records = getattr(datamodule, "records", None)
        if not isinstance(batch_size, int) or not callable(records):
            return
        n_train = len(records("train"))
        if batch_size > n_train:
            raise ValueError(
                f"data.batch_size={batch_size} is larger than the training split ({n_train} records): every step "
                f"would be one batch of all {n_train} records (and likely run out of memory). Use "
                f"--data.batch_size <= {n_train}, and --trainer.accumulate_grad_batches for a larger effective batch"
            )

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
        torch.manual_seed(_batch_seed(self._run_seed(), self.current_epoch, batch_idx, self.global_rank))

    def _run_seed(self) -> int:
        """The seed the per-batch dropout seeds derive from: the checkpoint's on resume, else the run's."""
        if self._batch_seed_base is None:
            self._batch_seed_base = int(os.environ.get("PL_GLOBAL_SEED", "0") or 0)
        return self._batch_seed_base

    def on_test_start(self) -> None:
        bad = non_finite_entries({n: p for n, p in self.named_parameters()})
        if bad:
            raise NonFiniteAdapterError(
                f"refusing to test a model with non-finite weights: {', '.join(bad)}. The checkpoint or export "
                "was written by a diverged run; use an earlier checkpoint"
            )

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        distributed = self._trainer is not None and self.trainer.world_size > 1
        loss = self._global_token_mean_loss(batch) if distributed else self._loss(batch)
        if not _finite_everywhere(loss, distributed):
            loss = loss.detach()
            bad = non_finite_entries({n: p for n, p in self.named_parameters() if p.requires_grad})
            if bad:
                self._diverged = f"the adapters hold non-finite values since step {self.global_step}: {', '.join(bad)}"
            raise FloatingPointError(
                f"training loss is {loss.item()} at global step {self.global_step} (batch {batch_idx}); "
                f"no optimizer step was taken with it"
                + (f", but the adapters are already non-finite ({', '.join(bad)}), so no checkpoint is written "
                   "with them" if bad else "")
                + f". Lower model.learning_rate (now {self.hparams.learning_rate}) or check the data, and "
                + self._resume_advice()
            )
        self._check_uniform_loss(loss, distributed)
        batch_size = batch["input_ids"].size(0)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size, sync_dist=distributed)
        return loss

    def _resume_advice(self) -> str:
        """Where to resume from after a failure: the run's last good checkpoint, by its path."""
        callback = self.trainer.checkpoint_callback if self._trainer is not None else None
        path = getattr(callback, "last_good_checkpoint", None)  # AdapterCheckpoint; else Lightning's own paths
        if path is None:
            path = getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "")
        if not path:
            return "start a new run with a lower --model.learning_rate (no good checkpoint was written yet)."
        return (f"resume from the last good checkpoint: --ckpt_path {path} --model.learning_rate <lower> (the new "
                "learning rate replaces the checkpoint's; no checkpoint is written from this failed state).")

    def _check_uniform_loss(self, loss: torch.Tensor, distributed: bool) -> None:
        """Stop when the loss has sat at ln(vocab_size) for ``divergence_patience`` steps in a row.

        A pretrained base's loss is away from ln(V) (on the embedded model it starts at 11.4, above
        ln(4096) = 8.318); one that has been away and is now pinned at ln(V) (within 0.01%) means
        the logits have collapsed to a uniform prediction (typically a learning rate far too high),
        which no further step recovers from. The run stops and no later checkpoint is written. A
        randomly initialised model, which *starts* at ln(V), is not flagged until it has left it.
        """
        patience = self.hparams.get("divergence_patience", 0)
        vocab = getattr(getattr(self.model, "config", None), "vocab_size", None)
        if not patience or not vocab:
            return
        uniform = math.log(vocab)
        value = float(loss.detach())
        self._farthest_from_uniform = max(self._farthest_from_uniform, abs(value - uniform) / uniform)
        was_away = self._farthest_from_uniform > 0.02
        at_uniform = torch.as_tensor(was_away and abs(value - uniform) < 1e-4 * uniform, dtype=torch.long)
        if distributed:  # every rank must agree, or one would stop alone
            from qblora_pl.distributed import global_token_count

            at_uniform = (global_token_count(at_uniform) == self.trainer.world_size).long()
        self._uniform_loss_steps = self._uniform_loss_steps + 1 if int(at_uniform) else 0
        if self._uniform_loss_steps >= patience:
            good = self.global_step - self._uniform_loss_steps
            self._diverged = f"training diverged: the loss has been ln(vocab_size) since the update of step {good + 1}"
            raise TrainingDiverged(
                f"training diverged: train loss {value:.4f} = ln(vocab_size={vocab}) = {uniform:.4f} (a uniform "
                f"prediction) for {self._uniform_loss_steps} steps in a row, after having been "
                f"{100 * self._farthest_from_uniform:.0f}% away from it. model.learning_rate={self.hparams.learning_rate} is far too high: lower it "
                f"and resume with --ckpt_path from a checkpoint of global step {good} or earlier (later ones hold "
                f"diverged adapters; none is written now). model.divergence_patience=0 disables this check."
            )

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
        outputs = self(batch["input_ids"], batch.get("attention_mask"), batch["labels"])
        loss = outputs.loss
        # Weight by response tokens so the epoch value is the per-token loss of the split.
        n_tokens = int((batch["labels"][:, 1:] != -100).sum())
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=max(n_tokens, 1), sync_dist=True)
        self._uniform_batches[stage] = self._uniform_batches.get(stage, True) and _predicts_uniform(outputs.logits, batch["labels"])
        return loss

    def on_validation_epoch_start(self) -> None:
        self._uniform_batches.pop("val", None)

    def on_test_epoch_start(self) -> None:
        self._uniform_batches.pop("test", None)

    def on_validation_epoch_end(self) -> None:
        self._log_perplexity("val")
        self._check_uniform_prediction("val")

    def on_test_epoch_end(self) -> None:
        self._log_perplexity("test")
        self._check_uniform_prediction("test")

    def _check_uniform_prediction(self, stage: str) -> None:
        """Stop when every evaluated position predicts the uniform distribution (all logits equal).

        A collapsed model (a learning rate far too high) has loss ln(vocab_size) and scores like
        chance; without this check a short run passed fit and test with exit 0, and its collapsed
        checkpoint even ranked as best (an untrained run's loss is higher). Nothing is
        checkpointed after it (``_diverged``), and ``test`` reports it instead of a perplexity.
        """
        uniform = torch.tensor(int(self._uniform_batches.pop(stage, False)), device=self.device)
        if self._trainer is not None and self.trainer.world_size > 1:  # every rank must agree
            uniform = self.trainer.strategy.reduce(uniform, reduce_op="min")
        if not int(uniform) or (self._trainer is not None and self.trainer.sanity_checking):
            return
        vocab = getattr(getattr(self.model, "config", None), "vocab_size", None)
        what = "validation" if stage == "val" else "test"
        self._diverged = f"the model predicts the uniform distribution at the {what} of step {self.global_step}"
        raise TrainingDiverged(
            f"{self._diverged}: every {what} position has equal logits over all {vocab} tokens (loss = ln(vocab_size) "
            f"= {math.log(vocab) if vocab else float('nan'):.4f}); the adapters have collapsed. "
            + (f"model.learning_rate={self.hparams.learning_rate} is far too high: lower it and resume from a "
               f"checkpoint written before step {self.global_step} (none is written now)" if stage == "val" else
               "The checkpoint or export was written by a diverged run; test an earlier checkpoint")
        )

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


def _batch_seed(base: int, epoch: int, batch_idx: int, rank: int) -> int:
    """The torch seed for one training batch: a function of the run seed, epoch, batch and rank.

    Re-seeding before every batch makes the dropout masks of batch ``i`` independent of what else
    drew random numbers before it (dataloader iterators, sanity validation, a restart), so a run
    resumed from any checkpoint draws exactly what the uninterrupted run drew.
    """
    return (((base * 1_000_003 + epoch) * 1_000_003 + batch_idx) * 1_009 + rank) % (2**63 - 1)


def _predicts_uniform(logits: torch.Tensor, labels: torch.Tensor) -> bool:
    """Whether every scored position (label != -100) has all its logits equal (to 1e-4)."""
    scored = labels[:, 1:] != -100
    if not bool(scored.any()):
        return True
    # In the logits' own dtype (no float copy of a batch x length x vocab tensor): equal is equal.
    spread = (logits[:, :-1].amax(-1) - logits[:, :-1].amin(-1)).float()
    return bool((spread[scored] <= 1e-4).all())


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
