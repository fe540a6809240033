"""`main.py test` wiring: the EvaluationSuite callback, and evaluation of the exported native model."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch

from qblora_pl.callbacks.evaluation import EvaluationSuite
from qblora_pl.adapters import QABLoRA
from qblora_pl.data.datamodule import InstructionDataModule
from qblora_pl.evaluation import (
    MMLU,
    EvaluationDataError,
    GreedyExactMatch,
    InstructionPerplexity,
    LanguageModelScorer,
    ZeroShotMultipleChoice,
    run_tasks,
)
from qblora_pl.merging import merged
from qblora_pl.checkpoints import AdapterCheckpointMismatch
from qblora_pl.module import QuantizedCausalLM
from qblora_pl.quantization import GroupwiseInt
from tests.evaluation.test_tasks import mmlu_dir  # noqa: F401  (fixture)
from tests.export.conftest import adapted_module


@pytest.fixture(scope="module")
def zero_shot_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("zs") / "zs.json"
    words = ["cat", "mat", "sits", "tips", "diet", "sleep", "text", "French"]
    path.write_text(json.dumps([{"query": f"Repeat the word {w}:", "choices": [w, words[(i + 1) % 8], "the mat", "Add"],
                                 "gold": 0, "task": "repeat"} for i, w in enumerate(words)]))
    return path


def _tasks(mmlu_dir, zero_shot_file, data_dir):
    return [MMLU(data_path=str(mmlu_dir), k_shot=2, limit=6), ZeroShotMultipleChoice(data_path=str(zero_shot_file)),
            InstructionPerplexity(data_path=str(data_dir)), GreedyExactMatch(data_path=str(data_dir), limit=4, max_new_tokens=4)]


def test_suite_logs_prints_and_writes_json(tiny_model_dir, tiny_data_dir, mmlu_dir, zero_shot_file, tmp_path, capsys):  # noqa: F811
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    module = QuantizedCausalLM(str(tiny_model_dir), quantization=GroupwiseInt(bits=4, group_size=32), adapter=QABLoRA(budget_rank=2))
    data = InstructionDataModule(str(tiny_data_dir), tokenizer_name_or_path=str(tiny_model_dir), batch_size=8)
    suite = EvaluationSuite(_tasks(mmlu_dir, zero_shot_file, tiny_data_dir), batch_size=4, progress_bar=False)
    trainer = pl.Trainer(logger=TensorBoardLogger(tmp_path, name="run"), callbacks=[suite], enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    (metrics,) = trainer.test(module, datamodule=data)
    for key in ("test/mmlu/acc", "test/zero_shot/acc", "test/zero_shot/acc_norm", "test/zero_shot/acc/repeat",
                "test/instruction_ppl/response_loss", "test/exact_match/exact_match", "test/mmlu/examples_per_s"):
        assert key in metrics, key
    report = json.loads((tmp_path / "run" / "version_0" / "evaluation.json").read_text())
    assert report["tasks"]["zero_shot"]["metrics"]["acc"] == pytest.approx(metrics["test/zero_shot/acc"])
    assert report["tasks"]["mmlu"]["examples"] == 6 and report["model_name_or_path"] == str(tiny_model_dir)
    # The suite's response loss is the module's own test loss on the same records (same tokenization).
    assert metrics["test/instruction_ppl/response_loss"] == pytest.approx(metrics["test/loss"], rel=1e-4)
    assert "examples/s" in capsys.readouterr().out
    events = EventAccumulator(str(tmp_path / "run" / "version_0")).Reload()
    assert "test/mmlu/acc" in events.Tags()["scalars"]


def test_bad_record_fails_before_the_model_is_built(tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch):
    (tmp_path / "test.json").write_text(json.dumps([{"question": "q", "choices": ["a", "b", "c", "d"], "answer": "Z"}]))
    (tmp_path / "dev.json").write_text("[]")
    module = QuantizedCausalLM(str(tiny_model_dir), quantization=GroupwiseInt(bits=4, group_size=32), adapter=QABLoRA(budget_rank=2))
    monkeypatch.setattr(module, "configure_model", lambda: pytest.fail("model work started before the data was checked"))
    data = InstructionDataModule(str(tiny_data_dir), tokenizer_name_or_path=str(tiny_model_dir))
    trainer = pl.Trainer(logger=False, callbacks=[EvaluationSuite([MMLU(data_path=str(tmp_path), k_shot=0)])],
                         enable_progress_bar=False, default_root_dir=tmp_path)
    with pytest.raises(EvaluationDataError, match=r"test\.json: row 0 \(0-based\): answer 'Z'"):
        trainer.test(module, datamodule=data)


def test_exported_native_model_scores_like_the_merged_model(tiny_model_dir, tiny_data_dir, mmlu_dir, zero_shot_file, tmp_path):  # noqa: F811
    from qblora_pl.export import export_module
    from transformers import AutoTokenizer

    module = adapted_module(tiny_model_dir, "qablora", std=0.3)
    export_module(module, tmp_path / "exports", formats=["native"], verify=False, log=lambda _: None)
    native_dir = tmp_path / "exports" / "native"
    tokenizer = AutoTokenizer.from_pretrained(native_dir)
    tokenizer.pad_token = tokenizer.eos_token
    tasks = _tasks(mmlu_dir, zero_shot_file, tiny_data_dir)

    native = QuantizedCausalLM(str(native_dir))  # detected as a native export: no adapters injected
    native.configure_model()
    assert not native.adapted_layers() and not any(p.requires_grad for p in native.parameters())
    with merged(module.model):
        in_memory = run_tasks(module.model, tokenizer, tasks, batch_size=4, progress=False)
        merged_lls = tasks[1].choice_loglikelihoods(LanguageModelScorer(module.model, tokenizer, progress=False))
    exported = run_tasks(native.model, tokenizer, tasks, batch_size=4, progress=False)
    native_lls = tasks[1].choice_loglikelihoods(LanguageModelScorer(native.model, tokenizer, progress=False))
    unmerged_lls = tasks[1].choice_loglikelihoods(LanguageModelScorer(module.model, tokenizer, progress=False))
    assert torch.allclose(torch.tensor(native_lls), torch.tensor(merged_lls), atol=1e-4)
    assert torch.allclose(torch.tensor(native_lls), torch.tensor(unmerged_lls), atol=1e-3)  # QA-BLoRA merges exactly
    for name in ("mmlu", "zero_shot", "exact_match"):
        assert exported[name]["metrics"] == in_memory[name]["metrics"], name
    for key, value in in_memory["instruction_ppl"]["metrics"].items():
        assert exported["instruction_ppl"]["metrics"][key] == pytest.approx(value, rel=1e-4)

    with pytest.raises(AdapterCheckpointMismatch, match="merged native export.*drop --ckpt_path"):
        native.on_load_checkpoint({"state_dict": {}, "adapter_spec": module.adapter_spec()})
    data = InstructionDataModule(str(tiny_data_dir), tokenizer_name_or_path=str(native_dir), batch_size=8)
    with pytest.raises(ValueError, match="merged native export.*no adapters to train"):
        pl.Trainer(max_steps=1, logger=False, enable_progress_bar=False, default_root_dir=tmp_path).fit(
            QuantizedCausalLM(str(native_dir)), datamodule=data)


def test_cached_dequantized_weights_change_the_time_not_the_scores(tiny_model_dir, tiny_data_dir, mmlu_dir, zero_shot_file, tmp_path, monkeypatch):  # noqa: F811
    from qblora_pl.quantization.int_layer import GroupwiseIntLinear

    calls = []
    real = GroupwiseIntLinear.dequantize
    monkeypatch.setattr(GroupwiseIntLinear, "dequantize", lambda self, dtype=None: (calls.append(self), real(self, dtype))[1])
    module = QuantizedCausalLM(str(tiny_model_dir), quantization=GroupwiseInt(bits=4, group_size=32), adapter=QABLoRA(budget_rank=2))
    data = InstructionDataModule(str(tiny_data_dir), tokenizer_name_or_path=str(tiny_model_dir), batch_size=8)
    reports, counts = {}, {}
    for cache in (False, True):
        calls.clear()
        suite = EvaluationSuite(_tasks(mmlu_dir, zero_shot_file, tiny_data_dir)[:2], batch_size=4, progress_bar=False,
                                cache_dequantized_weights=cache, output_json=str(tmp_path / f"eval_{cache}.json"))
        pl.Trainer(logger=False, callbacks=[suite], enable_progress_bar=False, enable_model_summary=False,
                   default_root_dir=tmp_path, limit_test_batches=1).test(module, datamodule=data)
        reports[cache] = {name: (r["metrics"], r["per_example"]) for name, r in suite.results.items()}
        counts[cache] = len(calls)
    assert reports[True] == reports[False]
    layers = len(module.adapted_layers())
    assert counts[True] < counts[False] and counts[True] <= 2 * layers + layers  # test loop + one unpack per layer
    assert all(layer._dense_cache is None for layer in module.model.modules() if isinstance(layer, GroupwiseIntLinear))
