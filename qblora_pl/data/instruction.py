"""Instruction-tuning data (Alpaca-style records) as a Lightning data module.

Each record ``{"instruction", "input" (optional), "output"}`` becomes one causal-LM example:
``input_ids = prompt tokens + response tokens + eos`` with the prompt masked out of the loss
(``labels = -100`` over the prompt), which is the QLoRA recipe the paper follows
(METHOD.md §6: source length 384, target length 128, loss on the response only).

Data sources, chosen by what ``data_path`` is:

* a directory holding ``train``, ``val`` (or ``validation``) and ``test`` files, each ``.json``
  (a list of records) or ``.jsonl`` (one record per line): used as pre-split;
* a single ``.json`` / ``.jsonl`` file: split into train/val/test by a seeded shuffle;
* anything else that is not an existing path: a Hugging Face hub dataset name
  (``tatsu-lab/alpaca``, ``yahma/alpaca-cleaned``), loaded with ``datasets.load_dataset`` and
  split like a single file.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from qblora_pl.data.prompts import PromptTemplate, get_template
from qblora_pl.paths import EMBEDDED_DATA_DIR

IGNORE_INDEX = -100
"""Label value that ``torch.nn.functional.cross_entropy`` skips (its default ``ignore_index``)."""

SPLITS = ("train", "val", "test")
_SPLIT_FILE_STEMS = {"train": ("train",), "val": ("val", "validation"), "test": ("test",)}
_JSON_SUFFIXES = (".json", ".jsonl")
_TOKENIZE_CHUNK = 2048  # records per tokenizer call: bounds the transient Python-int lists


# --------------------------------------------------------------------------------------------
# Loading and validating records
# --------------------------------------------------------------------------------------------


def validate_records(rows: datasets.Dataset | Sequence[Mapping[str, Any]], source: str) -> list[dict[str, str]]:
    """Check every row and return plain ``{"instruction", "input", "output"}`` dicts.

    ``instruction`` and ``output`` must be strings; ``input`` may be absent or null (read as
    ``""``) but otherwise must be a string too. The error names ``source`` (a file or hub
    dataset), the 0-based row and the field, so a bad line in a 50k-record file can be found.
    """
    if isinstance(rows, datasets.Dataset):
        names = set(rows.column_names)
        # Column-wise access is much faster than row dicts for Arrow-backed datasets.
        columns = {f: (list(rows[f]) if f in names else None) for f in ("instruction", "input", "output")}
        n = rows.num_rows
        get = lambda field, i: columns[field][i] if columns[field] is not None else None  # noqa: E731
    else:
        n = len(rows)
        for i, row in enumerate(rows):
            if not isinstance(row, Mapping):
                raise ValueError(f"{source}: row {i} is a {type(row).__name__}, expected a JSON object with "
                                 "'instruction', optional 'input' and 'output' fields")
        get = lambda field, i: rows[i].get(field)  # noqa: E731

    records = []
    for i in range(n):
        record = {}
        for field in ("instruction", "input", "output"):
            value = get(field, i)
            if value is None:
                if field == "input":
                    value = ""
                else:
                    raise ValueError(f"{source}: row {i} (0-based): required field {field!r} is missing or null")
            elif not isinstance(value, str):
                raise ValueError(
                    f"{source}: row {i} (0-based): field {field!r} must be a string, "
                    f"got {type(value).__name__} ({value!r:.60})"
                )
            record[field] = value
        records.append(record)
    return records


def load_json_records(path: str | os.PathLike) -> list[dict[str, str]]:
    """Read and validate one local ``.json`` (list of records) or ``.jsonl`` (record per line) file."""
    path = Path(path)
    if path.suffix not in _JSON_SUFFIXES:
        raise ValueError(f"{path}: unsupported file type {path.suffix!r}; expected a .json list of records "
                         "or a .jsonl file with one record per line")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; check data_path (cwd is {Path.cwd()})")
    try:
        with path.open("rb"):
            pass
    except OSError as err:
        raise ValueError(f"{path}: cannot be read ({err.strerror}); check its permissions") from err
    if path.stat().st_size == 0:
        return []
    try:
        rows = datasets.load_dataset("json", data_files=str(path), split="train")
    except Exception as err:  # datasets wraps Arrow's parse error in DatasetGenerationError
        cause = err.__cause__ or err
        kind = "a JSON list of records" if path.suffix == ".json" else "JSON Lines (one object per line)"
        raise ValueError(f"{path}: could not be parsed as {kind}: {cause}") from err
    return validate_records(rows, str(path))


def _split_file(directory: Path, split: str) -> Path | None:
    found = [directory / f"{stem}{suffix}" for stem in _SPLIT_FILE_STEMS[split] for suffix in _JSON_SUFFIXES]
    found = [p for p in found if p.exists()]
    if len(found) > 1:
        raise ValueError(f"{directory}: several files for split {split!r} ({', '.join(p.name for p in found)}); "
                         "keep one")
    return found[0] if found else None


def _looks_like_local_path(data_path: str) -> bool:
    # Hub names are "owner/name": never absolute, never "./x", never ending in .json[l].
    return (
        data_path.startswith(("/", ".", "~"))
        or Path(data_path).suffix in _JSON_SUFFIXES
        or os.sep != "/" and os.sep in data_path
    )


def split_indices(n: int, val_fraction: float, test_fraction: float, seed: int) -> dict[str, list[int]]:
    """Deterministic train/val/test partition of ``range(n)`` (each split in ascending order).

    A positive fraction always yields at least one record (so tiny files still get a val split).
    ``random.Random`` is used because its shuffle is stable across Python and torch versions.
    """

    def count(fraction: float) -> int:
        return 0 if fraction <= 0 or n == 0 else max(1, round(n * fraction))

    n_val = min(count(val_fraction), n)
    n_test = min(count(test_fraction), n - n_val)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return {
        "val": sorted(order[:n_val]),
        "test": sorted(order[n_val : n_val + n_test]),
        "train": sorted(order[n_val + n_test :]),
    }


def load_instruction_splits(
    data_path: str | os.PathLike,
    *,
    val_fraction: float = 0.05,
    test_fraction: float = 0.05,
    split_seed: int = 42,
    hf_split: str = "train",
    hf_config_name: str | None = None,
) -> dict[str, list[dict[str, str]]]:
    """Load validated records for ``train`` / ``val`` / ``test`` from a directory, a file or the hub."""
    data_path = os.fspath(data_path)
    local = Path(data_path).expanduser()
    if local.is_dir():
        files = {split: _split_file(local, split) for split in SPLITS}
        missing = [split for split, f in files.items() if f is None]
        if missing:
            wanted = ", ".join(f"{'|'.join(_SPLIT_FILE_STEMS[s])}.json[l]" for s in missing)
            raise FileNotFoundError(
                f"{local}: pre-split data directory lacks {wanted}; provide train, val and test files "
                "(.json or .jsonl), or point data_path at a single .json/.jsonl file to split it "
                "by val_fraction/test_fraction"
            )
        return {split: load_json_records(f) for split, f in files.items()}

    if local.exists() or _looks_like_local_path(data_path):
        if not local.exists():
            raise FileNotFoundError(
                f"data_path {data_path!r} does not exist (resolved to {local.resolve()}); pass an existing "
                ".json/.jsonl file, a directory with train/val/test files, or a Hugging Face hub dataset name"
            )
        records = load_json_records(local)
    else:
        source = f"hub dataset {data_path!r} (config={hf_config_name!r}, split={hf_split!r})"
        try:
            rows = datasets.load_dataset(data_path, hf_config_name, split=hf_split)
        except Exception as err:
            raise ValueError(
                f"data_path {data_path!r} is not an existing local path (checked {local.resolve()}) and "
                f"loading it as a Hugging Face hub dataset failed: {type(err).__name__}: {err}"
            ) from err
        records = validate_records(rows, source)

    parts = split_indices(len(records), val_fraction, test_fraction, split_seed)
    return {split: [records[i] for i in parts[split]] for split in SPLITS}


# --------------------------------------------------------------------------------------------
# Tokenization
# --------------------------------------------------------------------------------------------


class TokenizedInstructions(Dataset):
    """Tokenized examples of one split; labels are built on access from the stored prompt length.

    Token ids are kept as one int32 tensor per example (a 52k-record Alpaca split as Python int
    lists would cost hundreds of MB).
    """

    def __init__(self, input_ids: list[torch.Tensor], source_lengths: list[int], train_on_source: bool,
                 num_source_truncated: int = 0, num_target_truncated: int = 0) -> None:
        self.input_ids = input_ids
        self.source_lengths = source_lengths
        self.train_on_source = train_on_source
        self.num_source_truncated = num_source_truncated
        self.num_target_truncated = num_target_truncated

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.input_ids]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        input_ids = self.input_ids[index].long()
        labels = input_ids.clone()
        if not self.train_on_source:
            labels[: self.source_lengths[index]] = IGNORE_INDEX
        return {"input_ids": input_ids, "labels": labels}

    def stats(self) -> dict[str, float | int]:
        """Counts and mean token lengths (for the run log)."""
        n = len(self)
        total = sum(self.lengths)
        source = sum(self.source_lengths)
        return {
            "examples": n,
            "mean_source_tokens": source / n if n else 0.0,
            "mean_target_tokens": (total - source) / n if n else 0.0,
            "mean_total_tokens": total / n if n else 0.0,
            "max_total_tokens": max(self.lengths, default=0),
            "total_tokens": total,
            "supervised_tokens": total if self.train_on_source else total - source,
            "source_truncated": self.num_source_truncated,
            "target_truncated": self.num_target_truncated,
        }


def tokenize_records(
    records: Sequence[Mapping[str, str]],
    tokenizer: Any,
    template: str | PromptTemplate,
    max_source_length: int,
    max_target_length: int,
    train_on_source: bool = False,
) -> TokenizedInstructions:
    """Tokenize records as ``[bos] + prompt`` (≤ max_source_length) then ``output + eos`` (≤ max_target_length).

    Prompt and response are tokenized separately (as QLoRA does) so the loss mask falls exactly
    on the token boundary. Special tokens are added by hand, not by the tokenizer's
    post-processor, so a tokenizer that appends eos to every text cannot put one inside the prompt.
    Truncation keeps the beginning of each part; a truncated response loses its eos.
    """
    template = get_template(template)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', tokenizer)!r} has no eos token; "
                         "responses must end with one so the model learns to stop")
    bos = _bos_prefix(tokenizer)
    eos = [tokenizer.eos_token_id]
    input_ids, source_lengths = [], []
    src_cut = tgt_cut = 0
    for start in range(0, len(records), _TOKENIZE_CHUNK):
        chunk = records[start : start + _TOKENIZE_CHUNK]
        sources = tokenizer([template.format(r["instruction"], r.get("input")) for r in chunk],
                            add_special_tokens=False)["input_ids"]
        targets = tokenizer([r["output"] for r in chunk], add_special_tokens=False)["input_ids"]
        for src, tgt in zip(sources, targets):
            src = bos + src
            tgt = tgt + eos
            src_cut += len(src) > max_source_length
            tgt_cut += len(tgt) > max_target_length
            src, tgt = src[:max_source_length], tgt[:max_target_length]
            input_ids.append(torch.tensor(src + tgt, dtype=torch.int32))
            source_lengths.append(len(src))
    return TokenizedInstructions(input_ids, source_lengths, train_on_source, src_cut, tgt_cut)


def _bos_prefix(tokenizer: Any) -> list[int]:
    """``[bos_token_id]`` if the tokenizer's own special-token handling starts texts with BOS, else ``[]``."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [bos] if probe and probe[0] == bos else []


class InstructionCollator:
    """Right-pad a list of examples to the longest one: pad id in ``input_ids``, -100 in ``labels``."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, examples: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        width = max(len(ex["input_ids"]) for ex in examples)
        shape = (len(examples), width)
        input_ids = torch.full(shape, self.pad_token_id, dtype=torch.long)
        labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros(shape, dtype=torch.long)
        for row, ex in enumerate(examples):
            n = len(ex["input_ids"])
            input_ids[row, :n] = ex["input_ids"]
            labels[row, :n] = ex["labels"]
            attention_mask[row, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# --------------------------------------------------------------------------------------------
# Samplers
# --------------------------------------------------------------------------------------------


class LengthGroupedSampler(Sampler[int]):
    """Training order: a shuffle seeded by ``seed + epoch``, optionally grouped by length.

    Grouping follows Hugging Face's ``LengthGroupedSampler``: shuffle, cut into mega-batches of
    ``mega_batch_mult * batch_size``, sort each by length (longest first) and move the longest
    example of the epoch into the first batch, so an out-of-memory error shows at step 0.
    Consecutive ``batch_size`` slices then hold similar lengths and need little padding. Unlike
    Hugging Face, the batches (after the first) are then shuffled as wholes.

    The order depends only on ``(seed, epoch)``; Lightning calls ``set_epoch`` at every epoch
    start. ``resume(epoch, samples_done)`` skips the first ``samples_done`` indices of that
    epoch's order once, for resuming from a mid-epoch checkpoint.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 42, group_by_length: bool = True,
                 mega_batch_mult: int = 50) -> None:
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.group_by_length = group_by_length
        self.mega_batch_mult = mega_batch_mult
        self.epoch = 0
        self._skip: tuple[int, int] | None = None  # (epoch, samples) to skip on the next __iter__

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume(self, epoch: int, samples_done: int) -> None:
        self.epoch = epoch
        self._skip = (epoch, samples_done)

    def __len__(self) -> int:
        return len(self.lengths)

    def order(self, epoch: int | None = None) -> list[int]:
        """The full index order of ``epoch`` (default: the current one)."""
        generator = torch.Generator().manual_seed(self.seed + (self.epoch if epoch is None else epoch))
        perm = torch.randperm(len(self.lengths), generator=generator).tolist()
        if not self.group_by_length or not perm:
            return perm
        size = self.mega_batch_mult * self.batch_size
        megabatches = [sorted(perm[i : i + size], key=lambda j: -self.lengths[j]) for i in range(0, len(perm), size)]
        longest = max(range(len(megabatches)), key=lambda m: self.lengths[megabatches[m][0]])
        megabatches[0][0], megabatches[longest][0] = megabatches[longest][0], megabatches[0][0]
        grouped = [i for megabatch in megabatches for i in megabatch]
        # Shuffle whole batches (not within them) so lengths do not run long-to-short inside each
        # mega-batch, which would put a saw-tooth into the loss curve. The first batch (longest
        # example) stays first; a short last batch stays last so the DataLoader's cuts still align.
        bs = self.batch_size
        batches = [grouped[i : i + bs] for i in range(0, len(grouped), bs)]
        middle_end = len(batches) - 1 if len(batches[-1]) < bs else len(batches)
        middle = batches[1:middle_end]
        shuffled = [middle[k] for k in torch.randperm(len(middle), generator=generator).tolist()]
        batches = batches[:1] + shuffled + batches[middle_end:]
        return [i for batch in batches for i in batch]

    def __iter__(self) -> Iterator[int]:
        order = self.order()
        skip, self._skip = self._skip, None
        if skip is not None and skip[0] == self.epoch:
            order = order[skip[1] :]
        yield from order

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "seed": self.seed}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.epoch = int(state["epoch"])


class RankShareSampler(DistributedSampler):
    """Rank ``r`` of ``W``'s share of another sampler's order: ``order[r::W]``.

    With ``batch_size / W`` examples per rank, global batch ``i`` is then exactly batch ``i`` of
    a one-device run (``order[i*B : (i+1)*B]``), split over the ranks - so length grouping and the
    training order survive multi-device training. Lightning's own replacement
    (``DistributedSamplerWrapper``) reshuffles the wrapped order for training; being a
    ``DistributedSampler`` this one is left in place. An order not divisible by ``W`` is padded
    with its first indices, as ``DistributedSampler`` does.
    """

    def __init__(self, sampler: Sampler[int], num_replicas: int, rank: int) -> None:  # noqa: D107
        # DistributedSampler.__init__ wants a dataset and a process group; only its type is needed.
        self.sampler, self.num_replicas, self.rank, self.epoch = sampler, num_replicas, rank, 0

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.num_replicas)

    def __iter__(self) -> Iterator[int]:
        order = list(self.sampler)
        order += order[: (-len(order)) % self.num_replicas]
        return iter(order[self.rank :: self.num_replicas])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)


class LengthSortedSampler(Sampler[int]):
    """Evaluation order: longest first (ties in index order), so batches need little padding."""

    def __init__(self, lengths: Sequence[int]) -> None:
        self.indices = sorted(range(len(lengths)), key=lambda i: -lengths[i])

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)


# --------------------------------------------------------------------------------------------
# The data module
# --------------------------------------------------------------------------------------------


class InstructionDataModule(L.LightningDataModule):
    """Alpaca-style instruction data, tokenized for causal-LM fine-tuning with the loss on the response.

    Batches are dicts of LongTensors ``input_ids``, ``attention_mask`` and ``labels``, right-padded
    to the longest example in the batch; ``labels`` is -100 over the prompt and the padding.

    Args:
        data_path: A directory with ``train``/``val``/``test`` ``.json``/``.jsonl`` files (used as
            pre-split), a single ``.json`` (list of records) or ``.jsonl`` file (split by
            ``val_fraction``/``test_fraction``), or a Hugging Face hub dataset name such as
            ``tatsu-lab/alpaca`` (split the same way). Records need ``instruction`` and ``output``
            strings and may have an ``input`` string. Default: the small embedded data set.
        tokenizer_name_or_path: Tokenizer to load with ``AutoTokenizer.from_pretrained``; normally
            the model's own path. Required before ``setup``.
        prompt_template: Name of the prompt template: ``alpaca`` (Stanford Alpaca prompt) or
            ``plain`` (just the ``### Instruction/Input/Response`` headers).
        max_source_length: Maximum prompt tokens (BOS included); longer prompts are cut at the end.
        max_target_length: Maximum response tokens (EOS included); longer responses are cut at the end.
        train_on_source: Also put the loss on the prompt tokens (default: response only, as QLoRA).
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
        self.template = get_template(prompt_template)
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

        self.tokenizer: Any = None
        self.pad_token_id: int | None = None
        self._records: dict[str, list[dict[str, str]]] | None = None
        self._num_loaded_train: int | None = None
        self._datasets: dict[str, TokenizedInstructions] | None = None
        self._train_sampler: LengthGroupedSampler | None = None
        self._resume: dict[str, int] | None = None

    # -- data ------------------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Download what needs downloading (hub dataset, tokenizer) once per node."""
        local = Path(self.data_path).expanduser()
        if not local.exists() and not _looks_like_local_path(self.data_path):
            self._load_records()
        if self.tokenizer_name_or_path is not None:
            self._load_tokenizer()

    def _load_records(self) -> dict[str, list[dict[str, str]]]:
        if self._records is None:
            records = load_instruction_splits(
                self.data_path,
                val_fraction=self.val_fraction,
                test_fraction=self.test_fraction,
                split_seed=self.split_seed,
                hf_split=self.hf_split,
                hf_config_name=self.hf_config_name,
            )
            self._num_loaded_train = len(records["train"])
            if self.max_train_examples is not None:
                records["train"] = records["train"][: self.max_train_examples]
            self._records = records
        return self._records

    def records(self, split: str) -> list[dict[str, str]]:
        """The untokenized records of ``split`` (``train``/``val``/``test``), as used for training."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        return [dict(r) for r in self._load_records()[split]]

    def _load_tokenizer(self) -> Any:
        if self.tokenizer is None:
            if self.tokenizer_name_or_path is None:
                raise ValueError("tokenizer_name_or_path is not set; pass the model's path or hub name "
                                 "(the CLI links it to the model's path)")
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_name_or_path)
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
            self._datasets = {
                split: tokenize_records(records, tokenizer, self.template, self.max_source_length,
                                        self.max_target_length, self.train_on_source)
                for split, records in self._load_records().items()
            }
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

    def split_stats(self) -> dict[str, dict[str, float | int]]:
        """Per-split example counts, mean prompt/response/total token lengths and truncation counts."""
        if self._datasets is None:
            raise RuntimeError("call setup() before split_stats()")
        return {split: dataset.stats() for split, dataset in self._datasets.items()}

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
        trainer = getattr(self, "trainer", None)
        if trainer is not None and int(trainer.world_size) > 1 and trainer.distributed_sampler_kwargs:
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
                "shuffle_seed": self.shuffle_seed}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        if not state_dict:
            return
        if state_dict.get("split_seed", self.split_seed) != self.split_seed:
            raise ValueError(f"checkpoint data order used split_seed={state_dict['split_seed']}, this run uses "
                             f"split_seed={self.split_seed}; resume with the same seed")
        if state_dict.get("shuffle_seed", self.shuffle_seed) != self.shuffle_seed:
            raise ValueError(f"checkpoint data order used shuffle_seed={state_dict['shuffle_seed']}, this run uses "
                             f"shuffle_seed={self.shuffle_seed}; resume with the same seed")
        self._resume = {"epoch": int(state_dict["epoch"]), "samples_done": int(state_dict["samples_done"])}
        if self._train_sampler is not None:
            self._train_sampler.resume(self._resume["epoch"], self._resume["samples_done"])
