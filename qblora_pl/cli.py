"""LightningCLI entry point: ``python main.py {fit,validate,test,predict} --config ...``.

On top of Lightning's CLI:

* ``--ckpt_path`` never overrides the config silently. Lightning re-parses a checkpoint's
  hyper-parameters over the configuration; here they are *compared* with it instead
  (:meth:`QBLoRACLI._parse_ckpt_path`). The method, base, adapter shape and target modules come
  from the checkpoint where the config leaves them at their defaults (``main.py test
  --ckpt_path X`` without a config); set to something else they stop a ``fit`` with both
  values, and in ``test`` / ``validate`` / ``predict`` the checkpoint's replace them with a warning
  naming both (the checkpoint is evaluated as it was trained).
  The learning rate, warm-up, weight decay, data and trainer settings are the config's, and
  each one that differs from the checkpoint's is logged.
* ``--ckpt_path last`` is the newest ``last*.ckpt`` of this config's earlier runs
  (``<save_dir>/<name>/version_*/checkpoints/``); with none it stops instead of training anew.
* A checkpoint file that cannot be read is named (:class:`~qblora_pl.checkpoints.UnreadableCheckpoint`).
* Checkpoints are written by :class:`qblora_pl.callbacks.AdapterCheckpoint` (Lightning's
  ``ModelCheckpoint`` arguments and files; it never writes non-finite adapters and stops on Ctrl-C at
  a step boundary). Configs name it; a plain ``ModelCheckpoint`` is refused with that advice, and a
  run that names no checkpoint callback gets ``AdapterCheckpoint()`` where Lightning would add its
  default ``ModelCheckpoint()`` (said in one line; ``trainer.enable_checkpointing: false`` for none).
* A run that fails before its first step and wrote no checkpoint leaves no ``version_N``; each
  run claims its ``version_N`` exclusively (two runs started together never share one), and
  ``--trainer.default_root_dir`` moves the configs' relative logger ``save_dir`` under it.
* Errors end as one ``main.py: error: ...`` line, exit 2 for a user's mistake (:mod:`qblora_pl.errors`);
  a class in the config that refuses its arguments is named by where it sits.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn

from qblora_pl.checkpoints import read_checkpoint, same_setting
from qblora_pl.data.datamodule import InstructionDataModule
from qblora_pl.errors import configuration_error, exit_on_error
from qblora_pl.module import QuantizedCausalLM
from qblora_pl.paths import portable_model_reference, resolve_model_reference

#: Model arguments that define what a checkpoint's adapters are: they may not change on resume.
IDENTITY_ARGS = ("model_name_or_path", "quantization", "adapter", "target_modules")
#: Model arguments a resumed run may change (the config's value is used and the change logged).
CHANGEABLE_ARGS = ("learning_rate", "warmup_steps", "weight_decay", "optimizer", "gradient_checkpointing",
                   "divergence_patience")
_SAFE_CHECKPOINT = "qblora_pl.callbacks.AdapterCheckpoint"


class ResumeConfigError(ValueError):
    """``--ckpt_path`` and the configuration disagree on something a checkpoint cannot change."""


class CheckpointCallbackError(ValueError):
    """A config names a checkpoint callback that is not :class:`~qblora_pl.callbacks.AdapterCheckpoint`."""


def _plain_model_checkpoint(class_path: Any) -> bool:
    """Whether ``class_path`` names Lightning's ``ModelCheckpoint`` (or a subclass) but not ``AdapterCheckpoint``.

    Such a callback crashes the run the first time the adapters go non-finite (the module refuses to
    write them) and leaves Ctrl-C mid-step.
    """
    import importlib

    from lightning.pytorch.callbacks import ModelCheckpoint

    from qblora_pl.callbacks.checkpoint import AdapterCheckpoint

    if not isinstance(class_path, str):
        return False
    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name or "lightning.pytorch.callbacks"), name)
    except (ImportError, AttributeError, ValueError):
        return False  # jsonargparse names the unknown class itself
    return isinstance(cls, type) and issubclass(cls, ModelCheckpoint) and not issubclass(cls, AdapterCheckpoint)


def default_precision() -> str:
    """QLoRA's defaults: bf16 mixed precision on a GPU that supports it, full fp32 on CPU."""
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


class QBLoRACLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # The data module tokenizes with the model's own tokenizer unless told otherwise.
        # (embedded:tiny-llama resolved to this installation's path, as the model loads it)
        parser.link_arguments("model.model_name_or_path", "data.tokenizer_name_or_path",
                              compute_fn=resolve_model_reference)
        parser.set_defaults({"trainer.precision": default_precision()})

    # ------------------------------------------------------------------ --ckpt_path
    def _parse_ckpt_path(self) -> None:
        """Compare the checkpoint's hyper-parameters with the config (Lightning overwrites it with them)."""
        self._ckpt_step = 0
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        ckpt_path = config.get("ckpt_path")
        if not ckpt_path or ckpt_path in ("best", "hpc") or str(ckpt_path).startswith("registry"):
            return
        if ckpt_path == "last":
            ckpt_path = self._find_last_checkpoint(config)
            rank_zero_info(f"--ckpt_path last: {ckpt_path}")
            config["ckpt_path"] = ckpt_path
        checkpoint = read_checkpoint(ckpt_path, what="--ckpt_path")
        self._ckpt_step = int(checkpoint.get("global_step", 0))
        saved = dict(checkpoint.get("hyper_parameters") or {})
        defaults = self._subcommand_parsers[subcommand].get_defaults().get("model")
        model = config.get("model")
        from_checkpoint: dict[str, Any] = {}
        for key in IDENTITY_ARGS:
            if key not in saved:
                continue
            now, default = _plain(model.get(key)), _plain(defaults.get(key) if defaults is not None else None)
            recorded = saved[key]
            if key == "model_name_or_path":
                recorded = portable_model_reference(resolve_model_reference(recorded))
            if same_setting(now, default):
                if not same_setting(now, recorded):
                    from_checkpoint[key] = recorded
            elif not same_setting(now, recorded):
                if key == "model_name_or_path":
                    # Another location of the same base (a moved checkout, a local copy of a hub
                    # model): allowed; the base's sizes are checked against the checkpoint on load.
                    rank_zero_info(f"--ckpt_path {ckpt_path}: base model {now!r} instead of the recorded "
                                   f"{recorded!r} (it must be the same base; its sizes are checked on load)")
                    continue
                if subcommand != "fit":
                    # test / validate / predict evaluate the checkpoint as trained: its setting wins, loudly.
                    rank_zero_warn(f"--ckpt_path {ckpt_path} was trained with model.{key}={_show(recorded)}; the "
                                   f"config / command line's model.{key}={_show(now)} is replaced by it")
                    from_checkpoint[key] = recorded
                    continue
                raise ResumeConfigError(
                    f"--ckpt_path {ckpt_path} was trained with model.{key}={_show(recorded)}, but the config / command "
                    f"line sets model.{key}={_show(now)}{_differing(recorded, now)}. A checkpoint's method, base and "
                    "adapter shape cannot change: "
                    f"drop the differing setting (the checkpoint's is used) or start a new run without --ckpt_path"
                )
        if subcommand == "fit":
            self._log_resume_changes(ckpt_path, checkpoint, saved, model, config)
        if from_checkpoint:
            rank_zero_info(f"--ckpt_path {ckpt_path}: model settings from the checkpoint: "
                           + ", ".join(f"{k}={_show(v)}" for k, v in from_checkpoint.items()))
            self.config = self.parser.parse_object({subcommand: {"model": from_checkpoint}}, self.config)

    def _log_resume_changes(self, ckpt_path, checkpoint: dict, saved: dict, model, config) -> None:
        # Changed model.learning_rate etc. (CHANGEABLE_ARGS) are applied and logged by the module's on_load_checkpoint.
        saved_data = checkpoint.get("datamodule_hyper_parameters") or {}
        data = config.get("data")
        for key, value in sorted(saved_data.items()):
            if key.startswith("_") or key == "tokenizer_name_or_path" or data is None or key not in data:
                continue
            if not same_setting(_plain(data.get(key)), value):
                rank_zero_info(f"Resume: data.{key} = {data.get(key)!r} (the checkpoint's run used {value!r})")
        max_steps = config.get("trainer", {}).get("max_steps", -1)
        step = int(checkpoint.get("global_step", 0))
        if max_steps is not None and max_steps != -1 and max_steps <= step:
            raise ResumeConfigError(
                f"--ckpt_path {ckpt_path} is at global step {step} and trainer.max_steps={max_steps}: nothing to "
                f"train. Raise --trainer.max_steps above {step} to continue"
            )
        rank_zero_info(f"Resuming from {ckpt_path} at global step {step}"
                       + (f" (trainer.max_steps={max_steps})" if max_steps not in (None, -1) else ""))

    def _find_last_checkpoint(self, config) -> str:
        """The newest ``last*.ckpt`` of this configuration's earlier runs."""
        trainer = config.get("trainer") or {}
        root = trainer.get("default_root_dir") or os.getcwd()
        patterns = []
        for callback in trainer.get("callbacks") or []:
            dirpath = (callback.get("init_args") or {}).get("dirpath") if hasattr(callback, "get") else None
            if dirpath:
                patterns.append(os.path.join(dirpath, "last*.ckpt"))
        loggers = trainer.get("logger")
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            args = logger.get("init_args") if hasattr(logger, "get") else None
            if args is not None and args.get("save_dir") is not None:
                name = args.get("name") if args.get("name") is not None else "lightning_logs"
                save_dir = args.get("save_dir")
                save_dir = save_dir if os.path.isabs(save_dir) else os.path.join(root, save_dir)
                patterns.append(os.path.join(save_dir, name or "", "version_*", "checkpoints", "last*.ckpt"))
        if loggers is None or loggers is True:
            patterns.append(os.path.join(root, "lightning_logs", "version_*", "checkpoints", "last*.ckpt"))
        patterns.append(os.path.join(root, "checkpoints", "last*.ckpt"))
        found = [p for pattern in patterns for p in glob.glob(pattern) if os.path.isfile(p)]
        if not found:
            raise ResumeConfigError(
                "--ckpt_path last: there is no last checkpoint to resume from (looked for "
                + ", ".join(patterns) + "). Pass a checkpoint file, or drop --ckpt_path to start a new run"
            )
        return max(found, key=os.path.getmtime)

    # ------------------------------------------------------------------ configuration checks
    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as err:
            reason = configuration_error(err, self.config.get(self.config.get("subcommand") or "", self.config))
            if reason is err:
                raise
            raise reason from err

    def before_instantiate_classes(self) -> None:
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        trainer = config.get("trainer")
        accumulate = trainer.get("accumulate_grad_batches") if trainer is not None else None
        if accumulate is not None and (not isinstance(accumulate, int) or accumulate < 1):
            raise ResumeConfigError(
                f"trainer.accumulate_grad_batches={accumulate!r}: it must be an integer >= 1 "
                "(1 = an optimizer step per batch)"
            )
        _logs_under_default_root_dir(trainer)
        for index, callback in enumerate((trainer.get("callbacks") or []) if trainer is not None else []):
            if hasattr(callback, "get") and _plain_model_checkpoint(callback.get("class_path")):
                raise CheckpointCallbackError(
                    f"trainer.callbacks[{index}]: class_path {callback.get('class_path')} is not supported: it "
                    f"crashes the run when the adapters go non-finite and leaves Ctrl-C mid-step. Use class_path: "
                    f"{_SAFE_CHECKPOINT} (the same init_args and files)"
                )

    def _instantiate_trainer(self, config: dict, callbacks: list):
        from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar

        from qblora_pl.callbacks import AdapterCheckpoint, StepProgressBar

        configured = [*(config.get("callbacks") or []), *callbacks]
        if config.get("enable_progress_bar", True) is not False and not any(isinstance(c, ProgressBar) for c in configured):
            callbacks = [*callbacks, StepProgressBar()]  # "Epoch 0", not Lightning's "Epoch 0/-2"
        if config.get("enable_checkpointing", True) is not False and not any(
                isinstance(c, ModelCheckpoint) for c in configured):
            rank_zero_info(f"trainer.callbacks names no checkpoint callback: using {_SAFE_CHECKPOINT}() (Lightning "
                           "would add ModelCheckpoint()); trainer.enable_checkpointing: false writes none")
            callbacks = [*callbacks, AdapterCheckpoint()]
        return super()._instantiate_trainer(config, callbacks)

    # ------------------------------------------------------------------ failed runs
    def _run_subcommand(self, subcommand: str) -> None:
        try:
            self._claim_log_versions()
            super()._run_subcommand(subcommand)
        except BaseException:
            self._remove_empty_run_dir()
            raise

    def _claim_log_versions(self) -> None:
        """Create each logger's ``version_N`` directory now, exclusively, so two runs never share one.

        Lightning's loggers pick ``version_N`` by listing the existing ones, lazily: two fits started
        together in one folder both chose ``version_0`` and mixed their checkpoints and exports.
        Here rank 0 makes the directory with ``mkdir`` (which fails if another run made it first) and
        takes the next number until one is its own; other ranks receive rank 0's ``log_dir``.
        """
        if rank_zero_only.rank != 0:
            return
        for logger in self.trainer.loggers:
            if not isinstance(logger, (TensorBoardLogger, CSVLogger)) or logger._version is not None:
                continue
            root = logger.root_dir
            if "://" in root:  # remote storage: no exclusive create; Lightning's own choice stands
                continue
            os.makedirs(root, exist_ok=True)
            version = logger._get_next_version()
            while True:
                try:
                    os.mkdir(os.path.join(root, f"version_{version}"))
                    break
                except FileExistsError:
                    version += 1
            logger._version = version

    def _remove_empty_run_dir(self) -> None:
        """Remove this run's ``version_N`` when it trained no step and holds no checkpoint or result."""
        trainer = getattr(self, "trainer", None)
        if trainer is None or trainer.global_step > getattr(self, "_ckpt_step", 0) or not trainer.is_global_zero:
            return
        try:
            log_dir = trainer.logger.log_dir if trainer.logger is not None else None
        except Exception:
            return
        if not log_dir or not os.path.isdir(log_dir) or not Path(log_dir).name.startswith("version_"):
            return
        allowed = ("hparams.yaml", "config.yaml", "events.out.tfevents", "metrics.csv")
        for path in Path(log_dir).rglob("*"):
            if path.is_file() and not path.name.startswith(allowed):
                return  # a checkpoint or anything else: keep the directory
        shutil.rmtree(log_dir, ignore_errors=True)
        for parent in (Path(log_dir).parent, Path(log_dir).parent.parent):  # runs/<name>, runs: when now empty
            with contextlib.suppress(OSError):
                parent.rmdir()
        rank_zero_info(f"Removed {log_dir}: the run failed before its first step and wrote no checkpoint")


def _logs_under_default_root_dir(trainer) -> None:
    """``--trainer.default_root_dir DIR`` moves the configs' loggers (``save_dir: runs``) to ``DIR/runs``.

    Lightning applies ``default_root_dir`` only to loggers it creates itself; a logger named in the
    config keeps its ``save_dir`` relative to the working directory, so the option was silently
    ignored. A relative ``save_dir`` is taken relative to ``default_root_dir`` instead (as
    ``--ckpt_path last`` already looks for it); an absolute one is left as it is.
    """
    root = trainer.get("default_root_dir") if trainer is not None else None
    loggers = trainer.get("logger") if trainer is not None else None
    if not root:
        return
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        args = logger.get("init_args") if hasattr(logger, "get") else None
        save_dir = args.get("save_dir") if args is not None else None
        if isinstance(save_dir, str) and not os.path.isabs(save_dir) and "://" not in save_dir:
            args["save_dir"] = os.path.join(str(root), save_dir)


def _plain(value: Any) -> Any:
    """jsonargparse Namespaces as plain dicts (class_path / init_args), other values unchanged."""
    if hasattr(value, "as_dict"):
        return value.as_dict()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _differing(recorded: Any, now: Any) -> str:
    """`` (differs: init: checkpoint 'gptq', config 'mse')`` for two configs of one class; empty otherwise."""
    if not (isinstance(recorded, dict) and isinstance(now, dict) and "class_path" in recorded and "class_path" in now):
        return ""
    if not same_setting({"class_path": recorded["class_path"]}, {"class_path": now["class_path"]}):
        return ""
    old, new = recorded.get("init_args") or {}, now.get("init_args") or {}
    keys = [k for k in old if k in new and not same_setting(old[k], new[k])]
    return " (differs: " + "; ".join(f"{k}: checkpoint {old[k]!r}, config {new[k]!r}" for k in keys) + ")" if keys else ""


def _show(value: Any) -> str:
    """``LoRA(r=8, alpha=16)`` for a class_path dict, repr otherwise."""
    if isinstance(value, dict) and "class_path" in value:
        args = ", ".join(f"{k}={v!r}" for k, v in (value.get("init_args") or {}).items())
        return f"{str(value['class_path']).rsplit('.', 1)[-1]}({args})"
    return repr(value)


def main(args=None) -> QBLoRACLI:
    """Run the CLI; a user error ends as one ``main.py: error: ...`` line and exit 2 (:mod:`qblora_pl.errors`)."""
    try:
        return QBLoRACLI(
            QuantizedCausalLM,
            InstructionDataModule,
            seed_everything_default=42,
            save_config_kwargs={"overwrite": True},
            args=args,
        )
    except Exception as err:
        exit_on_error("main.py", err)
        raise
