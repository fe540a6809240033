"""Reading and validating training records: Alpaca records and chat conversations.

Three record kinds are accepted, told apart by their fields:

* **Alpaca**: ``{"instruction", "input" (optional), "output"}``, kept as
  ``{"instruction", "input", "output"}`` strings (an absent or null ``input`` reads as ``""``);
* **messages** (OpenAI style): ``{"messages": [{"role", "content"}, ...]}`` with roles
  ``system``, ``user`` and ``assistant``;
* **conversations** (ShareGPT style): ``{"conversations": [{"from", "value"}, ...]}`` with
  ``from`` one of ``system``, ``human`` / ``user``, ``gpt`` / ``assistant``.

Both conversation kinds are normalized to ``{"messages": [{"role", "content"}, ...]}`` with
the OpenAI role names. Kinds may be mixed in one data set: under ``prompt_template: chat`` an
Alpaca record is one user/assistant exchange (see :mod:`qblora_pl.data.tokenization`).

Sources, chosen by what ``data_path`` is (the "local or hub" decision is
:func:`qblora_pl.sources.looks_like_local_path`):

* a directory holding ``train``, ``val`` (or ``validation``) and ``test`` files, each ``.json``
  (a list of records) or ``.jsonl`` (one record per line): used as pre-split;
* a single ``.json`` / ``.jsonl`` file: split into train/val/test by a seeded shuffle;
* a Hugging Face hub dataset name (``tatsu-lab/alpaca``), loaded with
  :func:`qblora_pl.sources.load_hub_dataset` and split like a single file.

Local files are read with the ``json`` module, not ``datasets``' JSON reader: that reader
infers one Arrow type per column and coerces or rejects rows, so a bad row was reported
under the wrong index (or not at all).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qblora_pl.sources import load_hub_dataset, looks_like_local_path

SPLITS = ("train", "val", "test")
_SPLIT_FILE_STEMS = {"train": ("train",), "val": ("val", "validation"), "test": ("test",)}
_JSON_SUFFIXES = (".json", ".jsonl")

CHAT_ROLES = ("system", "user", "assistant")
"""Roles of a normalized conversation (OpenAI names)."""

SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
"""ShareGPT ``from`` values and the role each becomes."""

Record = dict[str, Any]
"""An Alpaca record ``{"instruction", "input", "output"}`` or a chat record ``{"messages": [...]}``."""


class RecordError(ValueError):
    """A record that cannot be used; the message names the file (or hub dataset) and the row."""


class EmptyFieldError(RecordError):
    """A required text field (output, instruction, message content) that is empty or blank."""


def is_chat_record(record: Mapping[str, Any]) -> bool:
    """True for a normalized conversation record (``{"messages": [...]}``)."""
    return "messages" in record


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _text(value: Any, what: str, where: str, allow_empty: bool = False) -> str:
    if value is None:
        raise RecordError(f"{where}: required field {what} is missing or null")
    if not isinstance(value, str):
        raise RecordError(f"{where}: field {what} must be a string, got {type(value).__name__} ({value!r:.60})")
    if not allow_empty and not value.strip():
        raise EmptyFieldError(f"{where}: field {what} is empty; every record needs text to condition on and "
                              "a non-empty response to train on (fix or remove the row, or set "
                              "data.drop_empty: true to drop such rows)")
    return value


def _alpaca_record(row: Mapping[str, Any], where: str) -> Record:
    instruction = _text(row.get("instruction"), "'instruction'", where)
    raw_input = row.get("input")
    return {
        "instruction": instruction,
        "input": "" if raw_input is None else _text(raw_input, "'input'", where, allow_empty=True),
        "output": _text(row.get("output"), "'output'", where),
    }


def _chat_record(row: Mapping[str, Any], where: str) -> Record:
    sharegpt = "conversations" in row
    key, role_key, content_key = ("conversations", "from", "value") if sharegpt else ("messages", "role", "content")
    turns = row.get(key)
    if not isinstance(turns, list) or not turns:
        got = "an empty list" if isinstance(turns, list) else type(turns).__name__
        raise RecordError(f"{where}: field {key!r} must be a non-empty list of {{{role_key!r}, {content_key!r}}} "
                          f"objects, got {got}")
    roles = SHAREGPT_ROLES if sharegpt else {role: role for role in CHAT_ROLES}
    messages = []
    for j, turn in enumerate(turns):
        at = f"{where}: {key}[{j}]"
        if not isinstance(turn, Mapping):
            raise RecordError(f"{at} is a {type(turn).__name__}, expected an object with {role_key!r} and "
                              f"{content_key!r}")
        role = turn.get(role_key)
        if role not in roles:
            known = ", ".join(sorted(roles))
            raise RecordError(f"{at}: unknown role {role!r} in field {role_key!r}; expected one of {known}")
        messages.append({"role": roles[role], "content": _text(turn.get(content_key), repr(content_key), at)})
    first_reply = next((j for j, m in enumerate(messages) if m["role"] == "assistant"), None)
    if first_reply is None:
        raise RecordError(f"{where}: conversation has no assistant turn (roles: "
                          f"{', '.join(m['role'] for m in messages)}); there is nothing to train on")
    if first_reply == 0:
        raise RecordError(f"{where}: conversation starts with an assistant turn; it needs a system or user "
                          "message before the first reply (the reply is trained given what precedes it)")
    return {"messages": messages}


def validate_record(row: Any, where: str) -> Record:
    """One raw row as a normalized record; :class:`RecordError` naming ``where`` if it is unusable."""
    if not isinstance(row, Mapping):
        raise RecordError(f"{where} is a {type(row).__name__}, expected a JSON object: an Alpaca record "
                          "('instruction', optional 'input', 'output') or a conversation ('messages' or "
                          "'conversations')")
    kinds = [k for k in ("messages", "conversations", "instruction") if k in row]
    if len(kinds) > 1:
        raise RecordError(f"{where}: has fields {', '.join(map(repr, kinds))}; a record is either an Alpaca "
                          "record ('instruction'/'output') or one conversation ('messages' or 'conversations')")
    if kinds and kinds[0] in ("messages", "conversations"):
        return _chat_record(row, where)
    return _alpaca_record(row, where)


def _validate(rows: Sequence[Any], source: str, drop_empty: bool) -> list[Record | None]:
    """Validated records, ``None`` in place of rows with an empty field when ``drop_empty``."""
    records: list[Record | None] = []
    for i, row in enumerate(rows):
        try:
            records.append(validate_record(row, f"{source}: row {i} (0-based)"))
        except EmptyFieldError:
            if not drop_empty:
                raise
            records.append(None)
    return records


def validate_records(rows: Sequence[Any], source: str, drop_empty: bool = False) -> list[Record]:
    """Check every row and return normalized records (see the module docstring for the kinds).

    Errors name ``source`` (a file or hub dataset), the 0-based row and the field, so a bad
    line in a 50k-record file can be found. An empty or blank ``instruction``, ``output`` or
    message content is an error, or, with ``drop_empty``, the row is left out.
    """
    return [r for r in _validate(rows, source, drop_empty) if r is not None]


# --------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------


def read_json_rows(path: str | os.PathLike) -> list[Any]:
    """The raw rows of a ``.json`` file (a list of records) or a ``.jsonl`` file (one a line).

    Blank lines of a ``.jsonl`` file are skipped (rows are numbered without them); an empty
    file has no rows.
    """
    path = Path(path)
    if path.suffix not in _JSON_SUFFIXES:
        raise RecordError(f"{path}: unsupported file type {path.suffix!r}; expected a .json list of records "
                          "or a .jsonl file with one record per line")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; check data_path (cwd is {Path.cwd()})")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a leading byte-order mark (Windows editors) is dropped
    except OSError as err:
        raise RecordError(f"{path}: cannot be read ({err.strerror}); check its permissions") from err
    except UnicodeDecodeError as err:
        raise RecordError(f"{path}: is not UTF-8 text ({err})") from err
    if not text.strip():
        return []
    if path.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise RecordError(f"{path}: could not be parsed as a JSON list of records: {err}") from err
        if not isinstance(rows, list):
            raise RecordError(f"{path}: expected a JSON list of records, got a {type(rows).__name__} "
                              "(use .jsonl for one record per line)")
        return rows
    rows = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise RecordError(f"{path}: could not be parsed as JSON Lines (one object per line): line {line_no} "
                              f"(row {len(rows)}, 0-based): {err}") from err
    return rows


def load_json_records(path: str | os.PathLike, drop_empty: bool = False) -> list[Record]:
    """Read and validate one local ``.json`` (list of records) or ``.jsonl`` (record per line) file."""
    return validate_records(read_json_rows(path), str(path), drop_empty)


def _split_file(directory: Path, split: str) -> Path | None:
    found = [directory / f"{stem}{suffix}" for stem in _SPLIT_FILE_STEMS[split] for suffix in _JSON_SUFFIXES]
    found = [p for p in found if p.exists()]
    if len(found) > 1:
        raise RecordError(f"{directory}: several files for split {split!r} ({', '.join(p.name for p in found)}); "
                          "keep one")
    return found[0] if found else None


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------


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


@dataclass
class RecordSplits:
    """Validated records of each split, where each came from, and how many empty rows were dropped.

    ``origins[split][k]`` is ``(source, row)`` of ``records[split][k]``: the file or hub dataset
    and the 0-based row, for errors raised later (tokenization) that must name the row.
    """

    records: dict[str, list[Record]]
    origins: dict[str, list[tuple[str, int]]]
    dropped_empty: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))


def _keep(records: list[Record | None], source: str,
          indices: Sequence[int]) -> tuple[list[Record], list[tuple[str, int]], int]:
    kept = [i for i in indices if records[i] is not None]
    return [records[i] for i in kept], [(source, i) for i in kept], len(indices) - len(kept)


def load_record_splits(
    data_path: str | os.PathLike,
    *,
    val_fraction: float = 0.05,
    test_fraction: float = 0.05,
    split_seed: int = 42,
    hf_split: str = "train",
    hf_config_name: str | None = None,
    drop_empty: bool = False,
) -> RecordSplits:
    """Load validated records for ``train`` / ``val`` / ``test`` from a directory, a file or the hub.

    With ``drop_empty``, rows with an empty field are removed *after* the split, so every
    other record lands in the same split as without the option.
    """
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
        result = RecordSplits({}, {})
        for split, path in files.items():
            records = _validate(read_json_rows(path), str(path), drop_empty)
            parts = _keep(records, str(path), range(len(records)))
            result.records[split], result.origins[split], result.dropped_empty[split] = parts
        return result

    if looks_like_local_path(data_path):
        if not local.exists():
            raise FileNotFoundError(
                f"data_path {data_path!r} does not exist (resolved to {local.resolve()}); pass an existing "
                ".json/.jsonl file, a directory with train/val/test files, or a Hugging Face hub dataset name"
            )
        source = str(local)
        rows = read_json_rows(local)
    else:
        source = f"hub dataset {data_path!r} (config={hf_config_name!r}, split={hf_split!r})"
        rows = load_hub_dataset(data_path, hf_config_name, hf_split, error=RecordError)
    records = _validate(rows, source, drop_empty)
    result = RecordSplits({}, {})
    for split, indices in split_indices(len(records), val_fraction, test_fraction, split_seed).items():
        result.records[split], result.origins[split], result.dropped_empty[split] = _keep(records, source, indices)
    return result


def load_instruction_splits(data_path: str | os.PathLike, **kwargs: Any) -> dict[str, list[Record]]:
    """The records of each split (see :func:`load_record_splits` for the arguments)."""
    return load_record_splits(data_path, **kwargs).records
