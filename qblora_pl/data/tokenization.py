"""Records to token ids and loss labels: prompt templates, chat templates, truncation, batching.

Two renderings, chosen by ``prompt_template``:

* ``alpaca`` / ``plain`` (:mod:`qblora_pl.data.prompts`): Alpaca records only. An example is
  ``[bos] + prompt`` (at most ``max_source_length`` tokens) then ``output + eos`` (at most
  ``max_target_length``), with the loss on the response only - the QLoRA recipe the paper
  follows (docs/method.md §6: source length 384, target length 128).
* ``chat``: the tokenizer's own chat template (``tokenizer.apply_chat_template``) renders each
  conversation; an Alpaca record is one exchange (user: the instruction, plus ``"\\n\\n"`` and
  the input when there is one; assistant: the output). The loss is on the assistant replies
  only, every turn of a multi-turn conversation included: each reply's content and the
  end-of-turn text the template puts after it (``<|im_end|>``), not the reply's header
  (``<|im_start|>assistant\\n``) and not whitespace after the end-of-turn token. The reply
  spans come from rendering the conversation prefix by prefix (:func:`render_conversation`),
  which works for any template whose rendering of a prefix is a prefix of the rendering of the
  whole conversation, and is refused with an error for a template that is not.
  An example is cut to ``max_source_length + max_target_length`` tokens in total (the end is
  cut, so a cut reply loses its end-of-turn token); an example left with no trained token is
  dropped, and both are counted.

``train_on_source`` puts the loss on every token instead (chat: the whole rendered text).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from qblora_pl.data.prompts import CHAT, PromptTemplate, resolve_template
from qblora_pl.data.records import RecordError, is_chat_record

IGNORE_INDEX = -100
"""Label value that ``torch.nn.functional.cross_entropy`` skips (its default ``ignore_index``)."""

_TOKENIZE_CHUNK = 2048  # records per tokenizer call: bounds the transient Python-int lists

Spans = tuple[tuple[int, int], ...]
"""``(start, end)`` token ranges that carry the loss, in order."""


class TokenizedInstructions(Dataset):
    """Tokenized examples of one split; labels are built on access from the stored loss spans.

    Token ids are kept as one int32 tensor per example (a 52k-record Alpaca split as Python int
    lists would cost hundreds of MB). ``target_spans[i]`` lists the token ranges of example
    ``i`` that carry the loss (default: everything after ``source_lengths[i]``, the Alpaca
    prompt); ``source_lengths[i]`` is where the first of them starts. ``kept[i]`` is the index
    of the record example ``i`` came from (records can be dropped, see :func:`tokenize_records`).
    """

    def __init__(self, input_ids: list[torch.Tensor], source_lengths: list[int], train_on_source: bool,
                 num_source_truncated: int = 0, num_target_truncated: int = 0, *,
                 target_spans: list[Spans] | None = None, num_truncated: int | None = None,
                 num_dropped_too_long: int = 0, kept: list[int] | None = None) -> None:
        self.input_ids = input_ids
        self.source_lengths = source_lengths
        self.train_on_source = train_on_source
        self.target_spans = target_spans
        self.num_source_truncated = num_source_truncated
        self.num_target_truncated = num_target_truncated
        self.num_truncated = max(num_source_truncated, num_target_truncated) if num_truncated is None else num_truncated
        self.num_dropped_too_long = num_dropped_too_long
        self.kept = list(range(len(input_ids))) if kept is None else kept

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.input_ids]

    def spans(self, index: int) -> Spans:
        """The token ranges of example ``index`` that carry the loss (without ``train_on_source``)."""
        if self.target_spans is not None:
            return self.target_spans[index]
        return ((self.source_lengths[index], len(self.input_ids[index])),)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        input_ids = self.input_ids[index].long()
        if self.train_on_source:
            return {"input_ids": input_ids, "labels": input_ids.clone()}
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        for start, end in self.spans(index):
            labels[start:end] = input_ids[start:end]
        return {"input_ids": input_ids, "labels": labels}

    def stats(self) -> dict[str, float | int]:
        """Counts, mean token lengths and truncation counts (for the run log).

        ``source`` tokens are those without loss (prompt, chat headers and user turns), ``target``
        tokens those with it (responses, assistant replies). ``truncated`` counts examples cut
        by the length limits; ``source_truncated`` / ``target_truncated`` split that by what was
        cut (Alpaca: prompt cut to max_source_length / response cut to max_target_length, one
        example can be both; chat: the cut removed only untrained tokens / some trained ones).
        ``dropped_too_long`` counts chat records with no trained token left after the cut.
        """
        n = len(self)
        total = sum(self.lengths)
        target = sum(end - start for i in range(n) for start, end in self.spans(i))
        return {
            "examples": n,
            "mean_source_tokens": (total - target) / n if n else 0.0,
            "mean_target_tokens": target / n if n else 0.0,
            "mean_total_tokens": total / n if n else 0.0,
            "max_total_tokens": max(self.lengths, default=0),
            "total_tokens": total,
            "supervised_tokens": total if self.train_on_source else target,
            "truncated": self.num_truncated,
            "source_truncated": self.num_source_truncated,
            "target_truncated": self.num_target_truncated,
            "dropped_too_long": self.num_dropped_too_long,
        }


def _where(origins: Sequence[tuple[str, int]] | None, k: int) -> str:
    if origins is None:
        return f"record {k} (0-based)"
    source, row = origins[k]
    return f"{source}: row {row} (0-based)"


def tokenize_records(
    records: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    template: str | PromptTemplate,
    max_source_length: int,
    max_target_length: int,
    train_on_source: bool = False,
    origins: Sequence[tuple[str, int]] | None = None,
) -> TokenizedInstructions:
    """Tokenize records with a prompt template or (``template="chat"``) the tokenizer's chat template.

    Prompt template: ``[bos] + prompt`` (≤ max_source_length) then ``output + eos``
    (≤ max_target_length). Prompt and response are tokenized separately (as QLoRA does) so the
    loss mask falls exactly on the token boundary. Special tokens are added by hand, not by
    the tokenizer's post-processor, so a tokenizer that appends eos to every text cannot put
    one inside the prompt. Truncation keeps the beginning of each part; a truncated response
    loses its eos. Chat: see the module docstring.

    ``origins[k]`` is ``(source, row)`` of ``records[k]``, named in errors.
    """
    template = resolve_template(template)
    if template == CHAT:
        return tokenize_conversations(records, tokenizer, max_source_length + max_target_length, train_on_source,
                                      origins)
    for k, record in enumerate(records):
        if is_chat_record(record):
            raise RecordError(f"{_where(origins, k)}: is a conversation ('messages' or 'conversations'), which the "
                              "Alpaca-style prompt templates cannot render; set data.prompt_template: chat to render "
                              "it with the tokenizer's chat template")
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', tokenizer)!r} has no eos token; "
                         "responses must end with one so the model learns to stop")
    bos = _bos_prefix(tokenizer)
    eos = [tokenizer.eos_token_id]
    input_ids, source_lengths = [], []
    src_cut = tgt_cut = any_cut = 0
    for start in range(0, len(records), _TOKENIZE_CHUNK):
        chunk = records[start : start + _TOKENIZE_CHUNK]
        sources = tokenizer([template.format(r["instruction"], r.get("input")) for r in chunk],
                            add_special_tokens=False)["input_ids"]
        targets = tokenizer([r["output"] for r in chunk], add_special_tokens=False)["input_ids"]
        for src, tgt in zip(sources, targets):
            src = bos + src
            tgt = tgt + eos
            cut_src, cut_tgt = len(src) > max_source_length, len(tgt) > max_target_length
            src_cut, tgt_cut, any_cut = src_cut + cut_src, tgt_cut + cut_tgt, any_cut + (cut_src or cut_tgt)
            src, tgt = src[:max_source_length], tgt[:max_target_length]
            input_ids.append(torch.tensor(src + tgt, dtype=torch.int32))
            source_lengths.append(len(src))
    return TokenizedInstructions(input_ids, source_lengths, train_on_source, src_cut, tgt_cut, num_truncated=any_cut)


def _bos_prefix(tokenizer: Any) -> list[int]:
    """``[bos_token_id]`` if the tokenizer's own special-token handling starts texts with BOS, else ``[]``."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [bos] if probe and probe[0] == bos else []


# --------------------------------------------------------------------------------------------
# Chat
# --------------------------------------------------------------------------------------------


def as_messages(record: Mapping[str, Any]) -> list[dict[str, str]]:
    """A record as a conversation: chat records as they are, an Alpaca record as one exchange."""
    if is_chat_record(record):
        return list(record["messages"])
    user = record["instruction"]
    if record.get("input") and record["input"].strip():
        user = f"{user}\n\n{record['input']}"
    return [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]


def _first_difference(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def render_conversation(messages: Sequence[Mapping[str, str]], tokenizer: Any,
                        where: str = "conversation") -> tuple[str, list[tuple[int, int]]]:
    """The conversation rendered by the tokenizer's chat template, and each assistant reply's character span.

    Reply ``i``'s span starts where ``messages[:i]`` rendered with ``add_generation_prompt=True``
    ends (after the reply header) and ends where ``messages[:i+1]`` rendered ends, less trailing
    whitespace (so ``content<|im_end|>`` without the newline after it). Both renderings must be
    prefixes of the whole conversation's rendering (the template is *prefix-stable*); otherwise
    the reply's position is not defined and a :class:`RecordError` names ``where``.
    """

    def render(msgs: Sequence[Mapping[str, str]], generation_prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(list(msgs), tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as err:
            roles = ", ".join(m["role"] for m in messages)
            raise RecordError(f"{where}: the tokenizer's chat template failed on this conversation "
                              f"(roles: {roles}): {type(err).__name__}: {err}") from err

    full = render(messages, False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        head, turn = render(messages[:i], True), render(messages[: i + 1], False)
        for what, prefix in ((f"messages[:{i}] with add_generation_prompt=True", head),
                             (f"messages[:{i + 1}]", turn)):
            if not full.startswith(prefix):
                at = _first_difference(prefix, full)
                raise RecordError(
                    f"{where}: the tokenizer's chat template is not prefix-stable: rendering {what} is not a "
                    f"prefix of the whole conversation's rendering (they differ at character {at}: "
                    f"{prefix[at:at + 40]!r} vs {full[at:at + 40]!r}), so the assistant message messages[{i}] "
                    "cannot be located for assistant-only labels. Use a template that renders a conversation "
                    "prefix as a prefix of the whole, or data.train_on_source: true to train on every token"
                )
        end = len(turn)
        while end > len(head) and turn[end - 1].isspace():
            end -= 1
        if end <= len(head):
            raise RecordError(f"{where}: the tokenizer's chat template rendered nothing for the assistant message "
                              f"messages[{i}] after its generation prompt ({turn[-40:]!r}); cannot place its labels")
        spans.append((len(head), end))
    return full, spans


def _token_spans(offsets: Sequence[tuple[int, int]], char_spans: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Token ranges whose tokens *start* inside each character span (a straddling token stays unlabelled)."""
    spans = []
    for lo, hi in char_spans:
        inside = [k for k, (start, _) in enumerate(offsets) if lo <= start < hi]
        if inside:
            spans.append((inside[0], inside[-1] + 1))
    return spans


def _token_spans_by_prefix(tokenizer: Any, text: str, ids: list[int], char_spans: Sequence[tuple[int, int]],
                           where: str) -> list[tuple[int, int]]:
    """Slow-tokenizer fallback: a boundary's token index is the length of the tokenized text before it."""

    def boundary(cut: int) -> int:
        prefix = tokenizer(text[:cut], add_special_tokens=False)["input_ids"]
        if ids[: len(prefix)] != prefix:
            raise RecordError(f"{where}: the tokens of the conversation up to character {cut} differ from the "
                              "start of the whole conversation's tokens, so the assistant reply's labels cannot be "
                              "placed on a token boundary (use a fast tokenizer, or data.train_on_source: true)")
        return len(prefix)

    return [(a, b) for a, b in ((boundary(lo), boundary(hi)) for lo, hi in char_spans) if b > a]


def tokenize_conversations(
    records: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    max_length: int,
    train_on_source: bool = False,
    origins: Sequence[tuple[str, int]] | None = None,
) -> TokenizedInstructions:
    """Tokenize records with the tokenizer's chat template, loss on the assistant replies (module docstring)."""
    if getattr(tokenizer, "chat_template", None) is None:
        name = getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
        first = f" (data: {_where(origins, 0).rsplit(': row', 1)[0]})" if origins else ""
        raise ValueError(
            f"prompt_template 'chat' renders with the tokenizer's chat template, but tokenizer {name!r} has none "
            f"(tokenizer.chat_template is None){first}. Use the tokenizer of a chat/instruct model (its "
            "tokenizer_config.json or GGUF file carries the template), or prompt_template: alpaca for Alpaca records"
        )
    use_offsets = bool(getattr(tokenizer, "is_fast", False))
    input_ids: list[torch.Tensor] = []
    source_lengths: list[int] = []
    target_spans: list[Spans] = []
    kept: list[int] = []
    src_cut = tgt_cut = dropped = 0
    eos_checked = train_on_source or tokenizer.eos_token_id is None
    for start in range(0, len(records), _TOKENIZE_CHUNK):
        chunk = records[start : start + _TOKENIZE_CHUNK]
        texts, char_spans = [], []
        for k, record in enumerate(chunk, start):
            where = _where(origins, k)
            if train_on_source:  # every token is trained: the reply positions are not needed
                messages = as_messages(record)
                try:
                    texts.append(tokenizer.apply_chat_template(messages, tokenize=False))
                except Exception as err:
                    raise RecordError(f"{where}: the tokenizer's chat template failed on this conversation: "
                                      f"{type(err).__name__}: {err}") from err
                char_spans.append([])
            else:
                text, spans = render_conversation(as_messages(record), tokenizer, where)
                texts.append(text)
                char_spans.append(spans)
        encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=use_offsets and not train_on_source)
        for j, ids in enumerate(encoded["input_ids"]):
            k = start + j
            if train_on_source:
                spans = [(0, len(ids))]
            elif use_offsets:
                spans = _token_spans(encoded["offset_mapping"][j], char_spans[j])
            else:
                spans = _token_spans_by_prefix(tokenizer, texts[j], ids, char_spans[j], _where(origins, k))
            if len(ids) > max_length:
                lost_target = any(end > max_length for _, end in spans)
                tgt_cut += lost_target
                src_cut += not lost_target
                ids = ids[:max_length]
                spans = [(a, min(b, max_length)) for a, b in spans if a < max_length]
            if not spans and not train_on_source:
                dropped += 1
                continue
            if not eos_checked:
                eos_checked = True
                _warn_if_eos_untrained(tokenizer, ids, spans, _where(origins, k))
            input_ids.append(torch.tensor(ids, dtype=torch.int32))
            source_lengths.append(spans[0][0] if spans else len(ids))
            target_spans.append(tuple(spans))
            kept.append(k)
    return TokenizedInstructions(input_ids, source_lengths, train_on_source, src_cut, tgt_cut,
                                 target_spans=target_spans, num_truncated=src_cut + tgt_cut,
                                 num_dropped_too_long=dropped, kept=kept)


def _warn_if_eos_untrained(tokenizer: Any, ids: list[int], spans: Sequence[tuple[int, int]], where: str) -> None:
    """Warn when the template's end of turn is not the eos token generation stops at."""
    trained = {ids[k] for a, b in spans for k in range(a, b)}
    if tokenizer.eos_token_id not in trained:
        last = tokenizer.convert_ids_to_tokens(ids[spans[-1][1] - 1]) if spans else None
        warnings.warn(
            f"chat template: the trained reply tokens of {where} do not contain the tokenizer's eos token "
            f"{tokenizer.eos_token!r} (the reply ends with {last!r}); generation stops at eos, so a model "
            "trained on this data may not learn to stop. Set the tokenizer's eos_token to the template's "
            "end-of-turn token",
            stacklevel=3,
        )


# --------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------


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


__all__ = [
    "IGNORE_INDEX", "InstructionCollator", "TokenizedInstructions", "as_messages", "render_conversation",
    "tokenize_conversations", "tokenize_records",
]
