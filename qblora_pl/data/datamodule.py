"""The instruction / chat fine-tuning data as a Lightning data module (``data:`` in configs/*.yaml).

Records (:mod:`qblora_pl.data.records`) are read and split once, tokenized with the chosen
template (:mod:`qblora_pl.data.tokenization`) and served in a seeded, length-grouped order
that a checkpoint can resume mid-epoch (:mod:`qblora_pl.data.sampler`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Sampler

from qblora_pl.data.prompts import resolve_template
from qblora_pl.data.records import SPLITS, Record, RecordSplits, load_record_splits
from qblora_pl.data.sampler import LengthGroupedSampler, LengthSortedSampler, RankShareSampler
from qblora_pl.data.tokenization import InstructionCollator, TokenizedInstructions, tokenize_records
from qblora_pl.paths import EMBEDDED_DATA_DIR
from qblora_pl.sources import load_tokenizer, looks_like_local_path


class InstructionDataModule(L.LightningDataModule):
    """Instruction or chat data, tokenized for causal-LM fine-tuning with the loss on the responses.

    Batches are dicts of LongTensors ``input_ids``, ``attention_mask`` and ``labels``, right-padded
    to the longest example in the batch; ``labels`` is -100 over the prompt (chat: everything but
    the assistant replies) and the padding.

    Args:
        data_path: A directory with ``train``/``val``/``test`` ``.json``/``.jsonl`` files (used as
            pre-split), a single ``.json`` (list of records) or ``.jsonl`` file (split by
            ``val_fraction``/``test_fraction``), or a Hugging Face hub dataset name such as
            ``tatsu-lab/alpaca`` (split the same way). Records are Alpaca records (``instruction``
            and ``output`` strings, optional ``input``), OpenAI-style ``messages`` conversations
            (``role`` system/user/assistant, ``content``) or ShareGPT ``conversations`` (``from``
            system/human/gpt, ``value``); kinds may be mixed under ``prompt_template: chat``
            (:mod:`qblora_pl.data.records`). Default: the small embedded data set.
        tokenizer_name_or_path: The tokenizer's source, read by
            :func:`qblora_pl.sources.load_tokenizer`: a model directory, a ``.gguf`` file (its
            embedded tokenizer) or a hub name; normally the model's own path. Required before ``setup``.
        prompt_template: ``alpaca`` (Stanford Alpaca prompt), ``plain`` (just the
            ``### Instruction/Input/Response`` headers) - both for Alpaca records only - or
            ``chat``: the tokenizer's own chat template, for conversations and Alpaca records
            (one user/assistant exchange), with the loss on every assistant reply
            (:mod:`qblora_pl.data.tokenization`). Conversations need ``chat``; it is not chosen
            for you.
        max_source_length: Maximum prompt tokens (BOS included); longer prompts are cut at the end.
            With ``chat``: an example may have ``max_source_length + max_target_length`` tokens
            in total, and longer ones are cut at the end (one left without a trained token is dropped).
        max_target_length: Maximum response tokens (EOS included); longer responses are cut at the end.
        train_on_source: Also put the loss on the prompt tokens (default: response only, as QLoRA;
            with ``chat``, every token of the rendered conversation).
        val_fraction: Fraction of records held out for validation when ``data_path`` is a single
            file or a hub dataset (ignored for a pre-split directory).
        test_fraction: Fraction of records held out for testing, as ``val_fraction``.
        split_seed: Seed of the train/val/test split, and of the training shuffle unless
            ``shuffle_seed`` is given.
        shuffle_seed: Seed of the training order (combined with the epoch number); default
            ``split_seed``. Vary it to repeat an experiment over data orders on a fixed split.
        batch_size: Training batch size (per device; the global batch under
            ``qblora_pl.distributed.FSDP2Strategy``, which splits it across ranks).
        eval_batch_size: Validation/test/predict batch size; defaults to ``batch_size``.
        group_by_length: Batch training examples of similar length together (shuffled within
            mega-batches of 50 batches) to save padding; evaluation batches are then sorted by
            length too.
        num_workers: DataLoader worker processes (0 loads in the main process).
        max_train_examples: Keep only the first N training records (quick runs, benchmarks).
        hf_split: Split to load from a hub dataset (``datasets`` slicing such as ``train[:1000]``
            works).
        hf_config_name: Configuration name of a hub dataset, if it has several.
        drop_empty: Leave out records with an empty or blank ``instruction``, ``output`` or message
            ``content`` (counted per split as ``dropped_empty``) instead of raising an error naming
            the first one. Rows are dropped after the split, so the other records keep their split.
    """

    def __init__(
        self,
        data_path: str = str(EMBEDDED_DATA_DIR / "instructions"),
        tokenizer_name_or_path: str | None = None,
        prompt_template: str = "alpaca",
        max_source_length: int = 384,
        max_target_length: int = 128,
        train_on_source: bool = False,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        split_seed: int = 42,
        shuffle_seed: int | None = None,
        batch_size: int = 4,
        eval_batch_size: int | None = None,
        group_by_length: bool = True,
        num_workers: int = 0,
        max_train_examples: int | None = None,
        hf_split: str = "train",
        hf_config_name: str | None = None,
        drop_empty: bool = False,
    ) -> None:
        super().__init__()
        for name, value, low in (("max_source_length", max_source_length, 1), ("max_target_length",
                                 max_target_length, 1), ("batch_size", batch_size, 1), ("num_workers", num_workers, 0)):
            if value < low:
                raise ValueError(f"{name}={value} must be >= {low}")
        if eval_batch_size is not None and eval_batch_size < 1:
            raise ValueError(f"eval_batch_size={eval_batch_size} must be >= 1 (or None to use batch_size)")
        if max_train_examples is not None and max_train_examples < 0:
            raise ValueError(f"max_train_examples={max_train_examples} must be >= 0 (or None for all)")
        if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ValueError(f"val_fraction={val_fraction} and test_fraction={test_fraction} must each be in "
                             "[0, 1) and sum to less than 1")
        self.save_hyperparameters()
        self.data_path = data_path
        self.tokenizer_name_or_path = tokenizer_name_or_path
        self.template = resolve_template(prompt_template)
        self.max_source_length = max_source_length
        self.max_target_length = max_target_length
        self.train_on_source = train_on_source
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.split_seed = split_seed
        self.shuffle_seed = split_seed if shuffle_seed is None else shuffle_seed
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.group_by_length = group_by_length
        self.num_workers = num_workers
        self.max_train_examples = max_train_examples
        self.hf_split = hf_split
        self.hf_config_name = hf_config_name
        self.drop_empty = drop_empty

        self.tokenizer: Any = None
        self.pad_token_id: int | None = None
        self._splits: RecordSplits | None = None
        self._num_loaded_train: int | None = None
        self._datasets: dict[str, TokenizedInstructions] | None = None
        self._train_sampler: LengthGroupedSampler | None = None
        self._resume: dict[str, int] | None = None
        self._train_digest: str | None = None

    # -- data ------------------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Download what needs downloading (hub dataset, tokenizer) once per node."""
        if not looks_like_local_path(self.data_path):
            self._load_splits()
        if self.tokenizer_name_or_path is not None:
            self._load_tokenizer()

    def _load_splits(self) -> RecordSplits:
        if self._splits is None:
            splits = load_record_splits(
                self.data_path,
                val_fraction=self.val_fraction,
                test_fraction=self.test_fraction,
                split_seed=self.split_seed,
                hf_split=self.hf_split,
                hf_config_name=self.hf_config_name,
                drop_empty=self.drop_empty,
            )
            self._num_loaded_train = len(splits.records["train"])
            if self.max_train_examples is not None:
                splits.records["train"] = splits.records["train"][: self.max_train_examples]
                splits.origins["train"] = splits.origins["train"][: self.max_train_examples]
            if any(splits.dropped_empty.values()):
                rank_zero_info(f"data: dropped records with an empty field (drop_empty): {splits.dropped_empty}")
            self._splits = splits
        return self._splits

    def records(self, split: str) -> list[Record]:
        """The untokenized records of ``split`` (``train``/``val``/``test``), as used for training.

        Alpaca records are ``{"instruction", "input", "output"}``, conversations
        ``{"messages": [{"role", "content"}, ...]}``. After ``setup``, chat records dropped for
        length (see ``max_source_length``) are left out, so record ``k`` is example ``k``.
        """
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        records = self._load_splits().records[split]
        if self._datasets is not None:
            records = [records[k] for k in self._datasets[split].kept]
        return [_copy(r) for r in records]

    def _load_tokenizer(self) -> Any:
        if self.tokenizer is None:
            if self.tokenizer_name_or_path is None:
                raise ValueError("tokenizer_name_or_path is not set; pass the model's path or hub name "
                                 "(the CLI links it to the model's path)")
            tokenizer = load_tokenizer(self.tokenizer_name_or_path)  # a .gguf file or tokenizer-only dir too
            if tokenizer.pad_token_id is None:
                # Any id works: padding is masked by attention_mask=0 and labels=-100. Setting it on
                # the tokenizer keeps generation code (which needs a pad id) consistent with training.
                fallback = tokenizer.eos_token or tokenizer.unk_token
                if fallback is None:
                    raise ValueError(f"tokenizer {self.tokenizer_name_or_path!r} has no pad, eos or unk token "
                                     "to pad batches with")
                tokenizer.pad_token = fallback
            self.tokenizer = tokenizer
            self.pad_token_id = tokenizer.pad_token_id
        return self.tokenizer

    def setup(self, stage: str | None = None) -> None:
        """Load, validate and tokenize every split once (later calls reuse the cache)."""
        if self._datasets is None:
            tokenizer = self._load_tokenizer()
            splits = self._load_splits()
            self._datasets = {
                split: tokenize_records(records, tokenizer, self.template, self.max_source_length,
                                        self.max_target_length, self.train_on_source, origins=splits.origins[split])
                for split, records in splits.records.items()
            }
            self._log_truncation()
        needed = {"fit": "train", "validate": "val", "test": "test", "predict": "test"}.get(stage or "")
        if needed is not None:
            self._dataset(needed)

    def _dataset(self, split: str) -> TokenizedInstructions:
        if self._datasets is None:
            raise RuntimeError("InstructionDataModule.setup() must run before the dataloaders are built")
        dataset = self._datasets[split]
        if len(dataset) == 0:
            counts = {s: len(d) for s, d in self._datasets.items()}
            detail = f"split sizes {counts}"
            if split == "train" and self.max_train_examples is not None:
                detail += f"; max_train_examples={self.max_train_examples} of {self._num_loaded_train} train records"
            if split == "train" and self.max_train_examples == 0:
                hint = "set max_train_examples to a positive number, or to null for all records"
            elif Path(self.data_path).is_dir():
                hint = f"add records to the {split} file in {self.data_path}"
            elif split == "train":
                hint = "use more records or smaller val_fraction/test_fraction"
            else:
                hint = (f"raise {split}_fraction above 0 (now {getattr(self, split + '_fraction')}), or skip this "
                        f"stage (e.g. Trainer limit_{split}_batches=0)")
            raise ValueError(f"split {split!r} of {self.data_path} is empty ({detail}); {hint}")
        return dataset

    def calibration_set(self, records: int, seq_len: int):
        """Token sequences to calibrate a quantized base on (GPTQ): ``records`` training examples drawn with
        ``split_seed``, rendered with this run's template and tokenizer, each cut to ``seq_len`` tokens."""
        from qblora_pl.quantization.calibration import select_calibration

        if self._datasets is None:
            self.setup("fit")
        return select_calibration(self._dataset("train").input_ids, records, seq_len, seed=self.split_seed,
                                  source=f"the training split of {self.data_path}")

    def split_stats(self) -> dict[str, dict[str, float | int]]:
        """Per-split example counts, mean prompt/response/total token lengths, truncation and drop counts.

        See :meth:`TokenizedInstructions.stats`; ``dropped_empty`` counts records left out by
        ``drop_empty``.
        """
        if self._datasets is None:
            raise RuntimeError("call setup() before split_stats()")
        dropped = self._load_splits().dropped_empty
        return {split: {**data.stats(), "dropped_empty": dropped[split]} for split, data in self._datasets.items()}

    def _log_truncation(self) -> None:
        """One log line per split whose examples were cut or dropped by the length limits."""
        chat = self.template == "chat"
        for split, stats in self.split_stats().items():
            if not (stats["truncated"] or stats["dropped_too_long"]):
                continue
            n = stats["examples"] + stats["dropped_too_long"]
            if chat:
                limit = self.max_source_length + self.max_target_length
                detail = (f"cut to {limit} tokens (max_source_length + max_target_length): {stats['truncated']} "
                          f"({stats['target_truncated']} lost reply tokens); dropped with no reply token left: "
                          f"{stats['dropped_too_long']}")
            else:
                detail = (f"prompt cut to max_source_length={self.max_source_length}: {stats['source_truncated']}, "
                          f"response cut to max_target_length={self.max_target_length}: {stats['target_truncated']}")
            rank_zero_info(f"data: {split}: {stats['truncated']} of {n} records truncated ({detail})")

    @property
    def num_train_tokens(self) -> int:
        """Tokens (prompt + response) in one epoch of training data."""
        return self.split_stats()["train"]["total_tokens"]

    # -- loaders ---------------------------------------------------------------------------

    def _loader(self, dataset: TokenizedInstructions, batch_size: int, sampler: Sampler[int] | None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            shuffle=False,
            collate_fn=InstructionCollator(self.pad_token_id),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        dataset = self._dataset("train")
        sampler = LengthGroupedSampler(dataset.lengths, self.batch_size, seed=self.shuffle_seed,
                                       group_by_length=self.group_by_length)
        if self._resume is not None:
            sampler.resume(self._resume["epoch"], self._resume["samples_done"])
            self._resume = None
        self._train_sampler = sampler
        # The sampler orders whole global batches; under FSDP2Strategy each rank loads its share.
        # Also on one rank: Lightning would otherwise wrap the sampler in a shuffling DistributedSampler.
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.distributed_sampler_kwargs:
            shares = trainer.distributed_sampler_kwargs
            return self._loader(dataset, self.device_batch_size(self.batch_size, "batch_size"),
                                RankShareSampler(sampler, shares["num_replicas"], shares["rank"]))
        return self._loader(dataset, self.device_batch_size(self.batch_size, "batch_size"), sampler)

    def _eval_loader(self, split: str) -> DataLoader:
        dataset = self._dataset(split)
        sampler = LengthSortedSampler(dataset.lengths) if self.group_by_length else None
        return self._loader(dataset, self.device_batch_size(self.eval_batch_size, "eval_batch_size"), sampler)

    def device_batch_size(self, batch_size: int, name: str = "batch_size") -> int:
        """Examples per rank: ``batch_size / world_size`` when the strategy splits a global batch.

        Strategies that set ``splits_global_batch`` (``qblora_pl.distributed.FSDP2Strategy``) treat
        ``data.batch_size`` as the global batch, so the optimisation does not change with the
        number of devices; every other strategy keeps Lightning's per-device meaning.
        """
        trainer = getattr(self, "trainer", None)
        if trainer is None or not getattr(trainer.strategy, "splits_global_batch", False):
            return batch_size
        world = int(trainer.world_size)
        if batch_size % world != 0:
            raise ValueError(
                f"data.{name}={batch_size} is the global batch under {type(trainer.strategy).__name__} and "
                f"must be divisible by the world size {world} (num_nodes {trainer.num_nodes} x devices "
                f"{world // max(trainer.num_nodes, 1)}); use e.g. data.{name}={max(world, batch_size // world * world)}"
            )
        return batch_size // world

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        """Test split in record order, so batch ``i`` row ``j`` is ``records("test")[i * eval_batch_size + j]``."""
        return self._loader(self._dataset("test"), self.eval_batch_size, None)

    # -- resume ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, int]:
        """Training-order position: the sampler epoch and how many samples of it were consumed.

        The consumed count comes from the trainer's batch progress (batches whose training step
        finished), times ``batch_size`` and the world size. Exact on one device; under DDP the
        distributed sampler wrapper makes it approximate.
        """
        if self._train_sampler is None:
            return {}
        epoch = self._train_sampler.epoch
        samples_done = 0
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            try:
                batches_done = int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)
                per_rank = self.device_batch_size(self.batch_size)
                samples_done = batches_done * per_rank * int(trainer.world_size)
            except AttributeError:
                pass
        if samples_done >= len(self._train_sampler):  # epoch finished: resume at the next one
            epoch, samples_done = epoch + 1, 0
        return {"epoch": epoch, "samples_done": samples_done, "split_seed": self.split_seed,
                "shuffle_seed": self.shuffle_seed, "train_records": len(self._dataset("train")),
                "train_digest": self.train_digest(), "data_path": str(self.data_path)}

    def train_digest(self) -> str:
        """A fingerprint of the training examples as trained on (their token ids), in split order.

        A checkpoint's position in the training order (epoch, samples done) means something only for
        these examples: another file, split or tokenizer gives another digest. The content is
        compared, not the path, so a moved data file still resumes.
        """
        if self._train_digest is None:
            digest = hashlib.sha256()
            for input_ids in self._dataset("train").input_ids:
                digest.update(input_ids.to(torch.int64).numpy().tobytes())
                digest.update(b"|")
            self._train_digest = digest.hexdigest()[:16]
        return self._train_digest

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        if not state_dict:
            return
        if state_dict.get("split_seed", self.split_seed) != self.split_seed:
            raise ValueError(f"checkpoint data order used split_seed={state_dict['split_seed']}, this run uses "
                             f"split_seed={self.split_seed}; resume with the same seed")
        if state_dict.get("shuffle_seed", self.shuffle_seed) != self.shuffle_seed:
            raise ValueError(f"checkpoint data order used shuffle_seed={state_dict['shuffle_seed']}, this run uses "
                             f"shuffle_seed={self.shuffle_seed}; resume with the same seed")
        saved_digest = state_dict.get("train_digest")
        if saved_digest is not None and saved_digest != self.train_digest():
            raise ValueError(
                f"--ckpt_path: the checkpoint was trained on other data (data_path "
                f"{state_dict.get('data_path', '?')!r}: {state_dict.get('train_records', '?')} training examples), but "
                f"this run's data.data_path={str(self.data_path)!r} gives {len(self._dataset('train'))} different ones. "
                f"A resume continues at the checkpoint's place in its training order (epoch {state_dict['epoch']}, "
                f"{state_dict['samples_done']} examples done), which other data does not have: resume with the same "
                "data file, split (val_fraction, test_fraction, split_seed, max_train_examples), template and "
                "tokenizer, or start a new run without --ckpt_path"
            )
        self._resume = {"epoch": int(state_dict["epoch"]), "samples_done": int(state_dict["samples_done"])}
        if self._train_sampler is not None:
            self._train_sampler.resume(self._resume["epoch"], self._resume["samples_done"])


def _copy(record: Record) -> Record:
    if "messages" in record:
        return {"messages": [dict(m) for m in record["messages"]]}
    return dict(record)

