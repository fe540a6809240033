"""Every shipped YAML config parses and instantiates through the CLI (STYLE.md practice 6)."""

from __future__ import annotations

import sys
from pathlib import Path
from unittest import mock

import pytest

from qblora_pl.adapters import LoRA, QABLoRA, QALoRA, QBLoRA
from qblora_pl.cli import QBLoRACLI
from qblora_pl.data.datamodule import InstructionDataModule
from qblora_pl.module import QuantizedCausalLM
from qblora_pl.quantization import NF4, GroupwiseInt

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
METHOD_CONFIGS = {"qlora": (NF4, LoRA), "qblora": (NF4, QBLoRA), "qalora": (GroupwiseInt, QALoRA), "qablora": (GroupwiseInt, QABLoRA)}


def _cli(args):
    with mock.patch.object(sys, "argv", ["main.py"]):
        return QBLoRACLI(
            QuantizedCausalLM, InstructionDataModule, run=False, args=args, save_config_kwargs={"overwrite": True}
        )


def test_every_config_is_covered():
    shipped = {p.stem for p in CONFIG_DIR.glob("*.yaml")}
    assert set(METHOD_CONFIGS) <= shipped
    assert shipped - set(METHOD_CONFIGS) <= {"fsdp", "smollm2", "eval_real"}, "a new config needs a parse test"


def test_every_part_is_included_by_a_method_config():
    """configs/parts/*.yaml hold what the method configs share; each is named (relative path) by one of them."""
    parts = sorted(p.name for p in (CONFIG_DIR / "parts").glob("*.yaml"))
    texts = "".join((CONFIG_DIR / f"{name}.yaml").read_text() for name in METHOD_CONFIGS)
    assert parts and all(f"parts/{part}" in texts for part in parts), parts


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
def test_config_starts_with_its_command(name):
    first = (CONFIG_DIR / f"{name}.yaml").read_text().splitlines()[0]
    assert first.startswith(("# python main.py fit --config configs/", "# python main.py test --config configs/")), first


@pytest.mark.parametrize("name", sorted(METHOD_CONFIGS))
def test_method_config_instantiates(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = _cli(["--config", str(CONFIG_DIR / f"{name}.yaml")])
    backend, strategy = METHOD_CONFIGS[name]
    assert isinstance(cli.model.quantization, backend)
    assert isinstance(cli.model.adapter, strategy)
    assert cli.datamodule.tokenizer_name_or_path == cli.model.model_name_or_path
    assert cli.trainer.max_steps > 0 and cli.trainer.gradient_clip_val == 0.3


def test_configs_compose_and_command_line_overrides(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    override = tmp_path / "override.yaml"
    override.write_text("model:\n  learning_rate: 0.001\n")
    cli = _cli(["--config", str(CONFIG_DIR / "qblora.yaml"), "--config", str(override), "--model.adapter.init_args.r", "4"])
    assert cli.model.hparams.learning_rate == 0.001
    assert cli.model.adapter.r == 4


@pytest.mark.parametrize("method", ["qablora", "qlora"])
def test_fsdp_config_composes_with_a_method_config(method, tmp_path, monkeypatch):
    from qblora_pl.distributed import FSDP2Strategy

    monkeypatch.chdir(tmp_path)
    args = ["--config", str(CONFIG_DIR / f"{method}.yaml"), "--config", str(CONFIG_DIR / "fsdp.yaml")]
    if method == "qlora":  # NF4 is refused under FSDP; the documented switch to the INT-b base
        args += ["--model.quantization", "qblora_pl.quantization.GroupwiseInt"]
    cli = _cli(args)
    assert isinstance(cli.trainer.strategy, FSDP2Strategy) and cli.trainer.strategy.splits_global_batch
    assert isinstance(cli.model.quantization, GroupwiseInt)
    assert isinstance(cli.model.adapter, METHOD_CONFIGS[method][1])
    assert cli.model.hparams.optimizer == "auto" and cli.trainer.max_steps > 0


def test_bad_strategy_hyperparameter_is_rejected_at_parse_time(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises((SystemExit, ValueError)):
        _cli(["--config", str(CONFIG_DIR / "qablora.yaml"), "--model.quantization.init_args.bits", "5"])


def test_test_subcommand_restores_the_checkpoints_strategy(tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch):
    """`main.py test --ckpt_path` re-parses the checkpoint's hyper-parameters as model arguments."""
    import lightning.pytorch as pl

    monkeypatch.chdir(tmp_path)
    module = QuantizedCausalLM(str(tiny_model_dir), quantization=GroupwiseInt(bits=4, group_size=32), adapter=QABLoRA(budget_rank=2))
    data = InstructionDataModule(str(tiny_data_dir), tokenizer_name_or_path=str(tiny_model_dir), batch_size=8)
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, limit_val_batches=0, enable_progress_bar=False)
    trainer.fit(module, datamodule=data)
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    cli = _cli(["--config", str(CONFIG_DIR / "qlora.yaml"), "--data.data_path", str(tiny_data_dir)])  # parse check only
    assert isinstance(cli.model.adapter, LoRA)
    with mock.patch.object(sys, "argv", ["main.py"]):
        cli = QBLoRACLI(
            QuantizedCausalLM, InstructionDataModule, run=True, save_config_kwargs={"overwrite": True},
            args=["test", "--config", str(CONFIG_DIR / "qablora.yaml"), "--model.model_name_or_path", str(tiny_model_dir),
                  "--data.data_path", str(tiny_data_dir), "--trainer.callbacks=[]", "--trainer.logger=false",
                  "--ckpt_path", str(tmp_path / "a.ckpt")],
        )
    assert isinstance(cli.model.adapter, QABLoRA) and cli.model.adapter.budget_rank == 2
    assert "test/loss" in cli.trainer.callback_metrics


def test_real_model_overlay_composes_with_every_method(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in METHOD_CONFIGS:
        cli = _cli(["--config", str(CONFIG_DIR / f"{name}.yaml"), "--config", str(CONFIG_DIR / "smollm2.yaml")])
        assert cli.datamodule.hparams.prompt_template == "chat" and cli.datamodule.drop_empty
        assert cli.trainer.max_steps == 200 and cli.trainer.gradient_clip_val == 0.3


def test_real_benchmark_overlay_names_arc_and_mmlu(tmp_path, monkeypatch):
    from qblora_pl.callbacks.evaluation import EvaluationSuite
    from qblora_pl.evaluation import MMLU, ZeroShotMultipleChoice

    monkeypatch.chdir(tmp_path)
    cli = _cli(["--config", str(CONFIG_DIR / "qlora.yaml"), "--config", str(CONFIG_DIR / "smollm2.yaml"),
                "--config", str(CONFIG_DIR / "eval_real.yaml")])
    suites = [c for c in cli.trainer.callbacks if isinstance(c, EvaluationSuite)]
    assert len(suites) == 1
    arc, mmlu = suites[0].tasks
    assert isinstance(arc, ZeroShotMultipleChoice) and arc.data_path.endswith("ARC-Easy-Test.jsonl") and arc.limit is None
    assert isinstance(mmlu, MMLU) and mmlu.k_shot == 5 and mmlu.limit_per_subject == 10
