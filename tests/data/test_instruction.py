"""InstructionDataModule: loading, validation errors, loss masks, padding, sampling and resume."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch

from qblora_pl.data.datamodule import InstructionDataModule
from qblora_pl.data.records import split_indices
from qblora_pl.data.sampler import LengthGroupedSampler
from qblora_pl.data.tokenization import IGNORE_INDEX
from qblora_pl.data.prompts import format_prompt

try:  # importable both as a package module and from pytest's rootdir-less sys.path insertion
    from tests.data.tokenizer_fixture import build_tiny_tokenizer
except ImportError:  # pragma: no cover
    from tokenizer_fixture import build_tiny_tokenizer

FIXTURE_DIR = Path(__file__).parent / "fixtures" / "instructions"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return str(build_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer")))


def make_records(n: int, seed: int = 0) -> list[dict]:
    """Records whose prompt and response lengths vary widely (so length grouping has work to do)."""
    gen = torch.Generator().manual_seed(seed)
    records = []
    for i in range(n):
        k = int(torch.randint(1, 30, (1,), generator=gen))
        m = int(torch.randint(1, 30, (1,), generator=gen))
        records.append({
            "instruction": f"Task {i}: " + "describe the task " * k,
            "input": "" if i % 3 else f"context {i}",
            "output": f"Answer {i}. " + "the response " * m,
        })
    return records


def write_json(path: Path, records) -> Path:
    path.write_text(json.dumps(records))
    return path


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def make_dm(data_path, tokenizer_dir, **kwargs) -> InstructionDataModule:
    dm = InstructionDataModule(data_path=str(data_path), tokenizer_name_or_path=tokenizer_dir, **kwargs)
    dm.setup("fit")
    return dm


# -- tokenization and loss mask ----------------------------------------------------------------


def test_labels_mask_exactly_the_prompt_and_cover_response_plus_eos(tokenizer_dir):
    dm = make_dm(FIXTURE_DIR, tokenizer_dir)
    tok = dm.tokenizer
    for split in ("train", "val", "test"):
        dataset = dm._datasets[split]
        for i, record in enumerate(dm.records(split)):
            example = dataset[i]
            ids, labels = example["input_ids"].tolist(), example["labels"].tolist()
            n_src = dataset.source_lengths[i]
            assert labels[:n_src] == [IGNORE_INDEX] * n_src
            assert labels[n_src:] == ids[n_src:] and IGNORE_INDEX not in labels[n_src:]
            assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
            assert tok.decode(ids[:n_src]) == "<s>" + format_prompt(record, "alpaca")
            assert tok.decode(labels[n_src:]) == record["output"] + "</s>"


def test_train_on_source_labels_every_token(tokenizer_dir):
    dm = make_dm(FIXTURE_DIR, tokenizer_dir, train_on_source=True, prompt_template="plain")
    example = dm._datasets["train"][0]
    assert torch.equal(example["labels"], example["input_ids"])
    assert dm.tokenizer.decode(example["input_ids"]).startswith("<s>### Instruction:\n")


def test_truncation_limits_source_and_target(tokenizer_dir, tmp_path):
    records = make_records(12)
    data = write_json(tmp_path / "all.json", records)
    dm = make_dm(data, tokenizer_dir, max_source_length=16, max_target_length=6, val_fraction=0.2, test_fraction=0.2)
    dataset = dm._datasets["train"]
    eos = dm.tokenizer.eos_token_id
    for i in range(len(dataset)):
        ids = dataset[i]["input_ids"].tolist()
        assert dataset.source_lengths[i] == 16  # every prompt is longer than 16 tokens
        assert len(ids) - 16 == 6  # every response + eos is longer than 6 tokens: cut, eos lost
        assert ids[-1] != eos
    stats = dm.split_stats()["train"]
    assert stats["source_truncated"] == stats["target_truncated"] == stats["examples"] == len(dataset)
    assert stats["mean_total_tokens"] == 22 and stats["supervised_tokens"] == 6 * len(dataset)
    assert dm.num_train_tokens == 22 * len(dataset)


def test_batches_are_right_padded_with_masked_padding(tokenizer_dir):
    dm = make_dm(FIXTURE_DIR, tokenizer_dir, batch_size=4)
    assert dm.tokenizer.pad_token_id == dm.tokenizer.eos_token_id  # tiny tokenizer has no pad token
    dataset = dm._datasets["train"]
    seen = 0
    for batch in dm.train_dataloader():
        assert set(batch) == {"input_ids", "attention_mask", "labels"}
        assert all(t.dtype == torch.long for t in batch.values())
        assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
        lengths = batch["attention_mask"].sum(1)
        assert batch["input_ids"].shape[1] == lengths.max()
        for row, n in enumerate(lengths.tolist()):
            assert batch["attention_mask"][row, :n].all() and not batch["attention_mask"][row, n:].any()
            assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
            assert (batch["input_ids"][row, n:] == dm.pad_token_id).all()
            assert n in dataset.lengths
        seen += len(lengths)
    assert seen == len(dataset) == 8


# -- data sources ------------------------------------------------------------------------------


def test_directory_input_is_used_as_presplit(tokenizer_dir):
    dm = make_dm(FIXTURE_DIR, tokenizer_dir)
    train = json.loads((FIXTURE_DIR / "train.json").read_text())
    assert [r["instruction"] for r in dm.records("train")] == [r["instruction"] for r in train]
    assert {s: v["examples"] for s, v in dm.split_stats().items()} == {"train": 8, "val": 2, "test": 2}
    assert dm.records("train")[5]["input"] == ""  # absent input reads as empty


@pytest.mark.parametrize("writer, name", [(write_json, "all.json"), (write_jsonl, "all.jsonl")])
def test_single_file_is_split_by_fractions(tokenizer_dir, tmp_path, writer, name):
    records = make_records(40)
    path = writer(tmp_path / name, records)
    dm = make_dm(path, tokenizer_dir, val_fraction=0.1, test_fraction=0.2)
    sizes = {s: len(dm.records(s)) for s in ("train", "val", "test")}
    assert sizes == {"train": 28, "val": 4, "test": 8}
    seen = [r["instruction"] for s in ("train", "val", "test") for r in dm.records(s)]
    assert sorted(seen) == sorted(r["instruction"] for r in records)


def test_split_is_deterministic_in_the_seed():
    assert split_indices(100, 0.05, 0.05, seed=1) == split_indices(100, 0.05, 0.05, seed=1)
    assert split_indices(100, 0.05, 0.05, seed=1) != split_indices(100, 0.05, 0.05, seed=2)
    parts = split_indices(3, 0.01, 0.01, seed=0)  # positive fractions keep at least one record
    assert (len(parts["train"]), len(parts["val"]), len(parts["test"])) == (1, 1, 1)


def test_max_train_examples_keeps_the_first_records(tokenizer_dir):
    dm = make_dm(FIXTURE_DIR, tokenizer_dir, max_train_examples=3)
    assert len(dm._datasets["train"]) == 3 and len(dm._datasets["val"]) == 2
    assert dm.records("train")[0]["instruction"] == "Give three tips for staying healthy."


def test_hub_name_goes_through_datasets_load_dataset(tokenizer_dir, monkeypatch):
    calls = []
    real_load = datasets.load_dataset

    def fake_load_dataset(path, name=None, **kwargs):
        if path == "json":
            return real_load(path, name, **kwargs)
        calls.append((path, name, kwargs))
        return datasets.Dataset.from_list(make_records(20))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    dm = InstructionDataModule("someone/alpaca-like", tokenizer_name_or_path=tokenizer_dir, hf_config_name="en",
                               hf_split="train[:20]", val_fraction=0.1, test_fraction=0.1)
    dm.prepare_data()
    dm.setup("fit")
    assert calls[0] == ("someone/alpaca-like", "en", {"split": "train[:20]"})
    assert {s: v["examples"] for s, v in dm.split_stats().items()} == {"train": 16, "val": 2, "test": 2}


def test_hub_failure_says_the_path_is_neither_local_nor_on_the_hub(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError, match=r"'tatsu-lab/alpaca' is not an existing local path.*ConnectionError"):
        InstructionDataModule("tatsu-lab/alpaca").records("train")


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad, field, message", [
    ({"instruction": "x"}, "output", "missing or null"),
    ({"output": "y"}, "instruction", "missing or null"),
    ({"instruction": "x", "output": 3}, "output", "must be a string, got int"),
    ({"instruction": ["x"], "output": "y"}, "instruction", "must be a string, got list"),
    ({"instruction": "x", "input": 7, "output": "y"}, "input", "must be a string, got int"),
])
@pytest.mark.parametrize("writer, name", [(write_json, "broken.json"), (write_jsonl, "broken.jsonl")])
def test_malformed_record_error_names_file_row_and_field(tmp_path, bad, field, message, writer, name):
    records = make_records(6)
    records[4] = bad
    path = writer(tmp_path / name, records)
    with pytest.raises(ValueError) as err:
        InstructionDataModule(str(path)).records("train")
    text = str(err.value)
    assert str(path) in text and "row 4" in text and repr(field) in text and message in text


def test_unparseable_jsonl_error_names_file(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c",\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl: could not be parsed as JSON Lines"):
        InstructionDataModule(str(path)).records("train")


def test_malformed_record_in_presplit_directory_names_that_file(tmp_path):
    write_json(tmp_path / "train.json", make_records(3))
    write_jsonl(tmp_path / "val.jsonl", [{"instruction": "ok", "output": "ok"}, {"instruction": "no output"}])
    write_json(tmp_path / "test.json", make_records(2))
    with pytest.raises(ValueError, match=r"val\.jsonl: row 1 \(0-based\): required field 'output'"):
        InstructionDataModule(str(tmp_path)).records("val")


@pytest.mark.parametrize("data_path", ["./no/such/data.json", "missing/train.jsonl", "/nonexistent/dir"])
def test_missing_local_path_raises_file_not_found(data_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist .*\.json/\.jsonl file, a directory"):
        InstructionDataModule(data_path).records("train")


def test_directory_without_all_splits_says_what_is_missing(tmp_path):
    write_json(tmp_path / "train.json", make_records(3))
    with pytest.raises(FileNotFoundError, match=r"lacks val\|validation\.json\[l\], test\.json\[l\]"):
        InstructionDataModule(str(tmp_path)).records("train")


def test_wrong_suffix_and_unknown_template_fail_fast(tmp_path):
    (tmp_path / "data.csv").write_text("instruction,output\n")
    with pytest.raises(ValueError, match=r"data\.csv: unsupported file type '\.csv'"):
        InstructionDataModule(str(tmp_path / "data.csv")).records("train")
    with pytest.raises(ValueError, match="unknown prompt template 'chatml'"):
        InstructionDataModule(prompt_template="chatml")
    with pytest.raises(ValueError, match="val_fraction=0.6 and test_fraction=0.5"):
        InstructionDataModule(val_fraction=0.6, test_fraction=0.5)


def test_empty_train_split_after_max_train_examples(tokenizer_dir):
    dm = InstructionDataModule(str(FIXTURE_DIR), tokenizer_name_or_path=tokenizer_dir, max_train_examples=0)
    with pytest.raises(ValueError, match=r"split 'train' .* is empty .*'train': 0.*max_train_examples=0 of 8"):
        dm.setup("fit")


def test_empty_file_and_empty_test_split_errors(tokenizer_dir, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    dm = InstructionDataModule(str(tmp_path / "empty.jsonl"), tokenizer_name_or_path=tokenizer_dir)
    with pytest.raises(ValueError, match=r"split 'train' .* is empty"):
        dm.setup("fit")
    dm = make_dm(write_json(tmp_path / "all.json", make_records(10)), tokenizer_dir, test_fraction=0.0)
    with pytest.raises(ValueError, match=r"split 'test' .* is empty .*test_fraction above 0"):
        dm.test_dataloader()


def test_missing_tokenizer_path_is_reported(tmp_path):
    with pytest.raises(ValueError, match="tokenizer_name_or_path is not set"):
        InstructionDataModule(str(FIXTURE_DIR)).setup("fit")


# -- sampling and resume -----------------------------------------------------------------------


def padding_fraction(batches) -> float:
    mask = torch.cat([b["attention_mask"].flatten() for b in batches])
    return 1 - mask.float().mean().item()


def test_length_grouping_reduces_padding_and_is_deterministic(tokenizer_dir, tmp_path):
    data = write_jsonl(tmp_path / "all.jsonl", make_records(200))
    grouped = make_dm(data, tokenizer_dir, batch_size=4, val_fraction=0.1, test_fraction=0.1)
    shuffled = make_dm(data, tokenizer_dir, batch_size=4, val_fraction=0.1, test_fraction=0.1, group_by_length=False)
    assert padding_fraction(grouped.train_dataloader()) < 0.5 * padding_fraction(shuffled.train_dataloader())
    assert padding_fraction(grouped.val_dataloader()) < padding_fraction(shuffled.val_dataloader())

    sampler = grouped.train_dataloader().sampler
    lengths = sampler.lengths
    assert sorted(sampler.order()) == list(range(len(lengths)))
    assert lengths[sampler.order()[0]] == max(lengths)  # longest example first: OOM shows at step 0
    again = LengthGroupedSampler(lengths, batch_size=4, seed=grouped.split_seed)
    assert list(again) == list(sampler)
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert epoch1 != again.order(0) and epoch1 == again.order(1)
    assert LengthGroupedSampler(lengths, 4, seed=7).order(1) != epoch1


def test_predict_loader_keeps_record_order(tokenizer_dir):
    dm = make_dm(FIXTURE_DIR, tokenizer_dir, eval_batch_size=1)
    records = dm.records("test")
    for record, batch in zip(records, dm.predict_dataloader()):
        n_src = int((batch["labels"][0] == IGNORE_INDEX).sum())
        assert dm.tokenizer.decode(batch["input_ids"][0, n_src:]) == record["output"] + "</s>"


def test_state_dict_round_trip_skips_consumed_samples(tokenizer_dir, tmp_path):
    data = write_jsonl(tmp_path / "all.jsonl", make_records(40))
    dm = make_dm(data, tokenizer_dir, batch_size=4, val_fraction=0.1, test_fraction=0.1)
    reference = dm.train_dataloader().sampler.order(2)
    dm.load_state_dict({"epoch": 2, "samples_done": 12, "split_seed": dm.split_seed})
    sampler = dm.train_dataloader().sampler
    assert list(sampler) == reference[12:]
    assert list(sampler) == reference  # the skip applies once
    state = dm.state_dict()
    assert {k: state[k] for k in ("epoch", "samples_done", "split_seed", "shuffle_seed")} == {
        "epoch": 2, "samples_done": 0, "split_seed": dm.split_seed, "shuffle_seed": dm.split_seed}
    assert state["train_records"] == 32 and state["data_path"] == str(data) and len(state["train_digest"]) == 16
    dm.load_state_dict(state)  # the same data resumes
    other = make_dm(write_jsonl(tmp_path / "other.jsonl", make_records(30)), tokenizer_dir, batch_size=4,
                    val_fraction=0.1, test_fraction=0.1)
    with pytest.raises(ValueError, match=r"trained on other data .*32 training examples.*gives 24 different ones"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="split_seed=1"):
        dm.load_state_dict({"epoch": 0, "samples_done": 0, "split_seed": 1})
    with pytest.raises(ValueError, match="shuffle_seed=7"):
        dm.load_state_dict({"epoch": 0, "samples_done": 0, "split_seed": dm.split_seed, "shuffle_seed": 7})


def test_shuffle_seed_changes_the_training_order_not_the_split(tokenizer_dir, tmp_path):
    data = write_jsonl(tmp_path / "all.jsonl", make_records(40))
    kwargs = dict(batch_size=4, val_fraction=0.1, test_fraction=0.1, split_seed=3)
    default, same, other = (make_dm(data, tokenizer_dir, **kwargs, **extra) for extra in ({}, {"shuffle_seed": 3}, {"shuffle_seed": 4}))
    for split in ("train", "val", "test"):
        assert default.records(split) == other.records(split)
    order = lambda dm: dm.train_dataloader().sampler.order(0)
    assert order(default) == order(same)
    assert order(default) != order(other)
    assert sorted(order(default)) == sorted(order(other))


def test_trainer_resume_mid_epoch_replays_the_same_batches(tokenizer_dir, tmp_path):
    """Checkpoints mid-epoch and at an epoch end; resuming from each continues the reference order."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    class RecordBatches(L.LightningModule):
        def __init__(self, log: list):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.seen = log

        def training_step(self, batch, batch_idx):
            self.seen.append(tuple(batch["input_ids"].flatten().tolist()))
            return (self.weight * batch["attention_mask"].float().mean()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = write_jsonl(tmp_path / "all.jsonl", make_records(16))  # 14 train records -> 7 batches/epoch

    def fit(log, ckpt_path=None, callbacks=()):
        dm = InstructionDataModule(str(data), tokenizer_name_or_path=tokenizer_dir, batch_size=2,
                                   val_fraction=0.07, test_fraction=0.07)
        trainer = L.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0, callbacks=list(callbacks),
                            enable_checkpointing=bool(callbacks), default_root_dir=tmp_path)
        trainer.fit(RecordBatches(log), datamodule=dm, ckpt_path=ckpt_path)

    reference: list = []
    ckpt_dir = tmp_path / "ckpt"
    fit(reference, callbacks=[ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=1, save_top_k=-1)])
    assert len(reference) == 14 and reference[:7] != reference[7:]
    assert sorted(reference[:7]) == sorted(reference[7:])  # n < mega-batch: same batches, new order
    for step in (3, 7, 10):  # mid epoch 0, end of epoch 0, mid epoch 1
        resumed: list = []
        fit(resumed, ckpt_path=next(ckpt_dir.glob(f"*-step={step}.ckpt")))
        assert resumed == reference[step:], f"resume from step {step}"
