"""Batched scoring of a causal LM: continuation log-likelihoods, next-token scores, greedy decoding.

Conventions follow lm-evaluation-harness (``lm_eval/models/huggingface.py``) so that the same
records give the same numbers:

* a (context, continuation) pair is tokenized as ``encode(context + continuation)`` split at
  ``len(encode(context))``, with trailing spaces of the context moved to the continuation
  (``TemplateLM._encode_pair``);
* the log-likelihood of a continuation is the sum of its tokens' log-probabilities, and it is
  *greedy* when every continuation token is the argmax;
* over-long inputs are cut from the left, keeping the continuation.

Unlike the harness, texts start with the tokenizer's BOS token when its own special-token
handling adds one (as the training data does, see ``tokenize_records``); run the harness with
``add_bos_token=True`` for a like-for-like comparison (``scripts/lm_eval_parity.py``).

Batches are left-padded with explicit ``position_ids``, so every row's last token sits at the
same index and the LM head only runs on the last ``n`` positions (``logits_to_keep``); padding
does not change any row's logits (tested against unpadded single rows).

Shared prefixes are computed once (``prefix_cache=True``, the default): rows that start with
the same tokens - the choices of one question, the questions of one MMLU subject behind the
same k shots - are grouped, the shared part runs once with the model's KV cache (up to
``batch_size`` prefixes per pass), and each batch of the rows' remaining tokens runs on a copy
of that cache (left-padded the same way, positions continuing after each row's prefix). A row
is only ever split, never re-tokenized: the model sees exactly the tokens of the uncached path,
and the logits agree to float rounding (tested). Rows cut by ``max_length``, prefixes shared by
one row only and models without a usable KV cache take the plain path.

Every logit that is read is checked: a model that produces NaN or infinite logits (diverged
weights, a broken export or quantization) raises :class:`NonFiniteLogitsError` instead of
reporting an accuracy - argmax over NaNs silently picks the first option, so an all-NaN model
would otherwise "score" the share of ``A`` answers.
"""

from __future__ import annotations

import copy
import inspect
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn


class NonFiniteLogitsError(RuntimeError):
    """The scored model produced NaN or infinite logits; no metric computed from them would mean anything."""


def check_finite(logits: torch.Tensor, what: str) -> None:
    """Raise :class:`NonFiniteLogitsError` if ``logits`` holds NaN or +-inf (a no-op otherwise)."""
    finite = torch.isfinite(logits)
    if bool(finite.all()):
        return
    bad = int((~finite).sum())
    nan = int(torch.isnan(logits).sum())
    raise NonFiniteLogitsError(
        f"the model produced non-finite logits while scoring {what}: {bad} of {logits.numel()} values are NaN or inf "
        f"({nan} NaN). Its weights or activations are broken (a diverged fine-tune, a bad checkpoint, export or "
        "quantization, or fp16 overflow); no accuracy is reported from such logits. Check the model, e.g. "
        "any(not p.isfinite().all() for p in model.parameters())"
    )


def _nan_guard_processor(what: str):
    """A ``LogitsProcessor`` that raises on NaN / +inf scores (-inf is a legitimate processor mask)."""
    from transformers import LogitsProcessor

    class _Guard(LogitsProcessor):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            broken = torch.isnan(scores) | torch.isposinf(scores)
            if bool(broken.any()):
                check_finite(scores.masked_fill(torch.isneginf(scores), 0.0), what)
            return scores

    return _Guard()


def bos_prefix(tokenizer: Any) -> list[int]:
    """``[bos_token_id]`` if the tokenizer's own special-token handling starts texts with BOS, else ``[]``."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [bos] if probe and probe[0] == bos else []


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def shared_prefix_groups(rows: Sequence[Sequence[int]], keeps: Sequence[int],
                         prefixes: Sequence[Sequence[int]]) -> tuple[list[tuple[list[int], list[int]]], list[int]]:
    """Group rows by the tokens they share with their hinted prefix; ``([(prefix ids, row indices)], rest)``.

    Row ``i``'s cacheable part is the longest common prefix of ``prefixes[i]`` and the row itself,
    cut so that the last ``keeps[i]`` positions (whose logits are read) stay outside it. Taking
    the common prefix rather than requiring ``prefixes[i]`` verbatim matters: BPE tokenizers
    often tokenize a prefix's trailing text differently on its own than followed by more text
    (SmolLM2: the blank line ending the k shots is one token alone, two before the question), and
    the row's own ids are what the model must see. Groups of one row and rows sharing nothing
    end up in ``rest`` (the plain path).
    """
    by_prefix: dict[tuple[int, ...], list[int]] = defaultdict(list)
    rest = []
    for i, (row, keep, prefix) in enumerate(zip(rows, keeps, prefixes)):
        n = min(common_prefix_length(prefix, row), len(row) - keep)
        if n > 0:
            by_prefix[tuple(row[:n])].append(i)
        else:
            rest.append(i)
    groups = []
    for prefix_ids, members in by_prefix.items():
        if len(members) > 1:
            groups.append((list(prefix_ids), members))
        else:
            rest += members
    return groups, sorted(rest)


#: How much padding (as a share of the real tokens) a pass of several shared prefixes may carry.
PREFIX_PADDING_SLACK = 0.1


class LanguageModelScorer:
    """Scores texts with ``model`` in batches of ``batch_size``; shows a tqdm bar per call.

    Args:
        model: a Hugging Face causal LM (adapted, merged or a native low-bit export).
        tokenizer: its tokenizer.
        batch_size: sequences per forward pass.
        max_length: longest input in tokens; default the model's ``max_position_embeddings``.
        progress: show progress bars (the suite turns them off on non-zero ranks).
        prefix_cache: compute prefixes shared by several rows once and score the rest of each
            row on a copy of their KV cache (see the module docstring); ``False`` runs every row
            in full (the reference path, for parity checks). Models whose ``forward`` takes no
            cache argument, or that return no cache, always run in full.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, batch_size: int = 8, max_length: int | None = None,
                 progress: bool = True, prefix_cache: bool = True) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        config = getattr(model, "config", None)
        self.max_length = max_length or getattr(config, "max_position_embeddings", None) or 2048
        self.progress = progress
        self.bos = bos_prefix(tokenizer)
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        self.pad_id = int(pad)
        self.eos_id = tokenizer.eos_token_id
        parameters = inspect.signature(model.forward).parameters
        self._logits_to_keep = "logits_to_keep" in parameters
        # transformers 5.x names the argument ``cache`` (``past_key_values`` is its deprecated alias)
        self._cache_argument = next((name for name in ("cache", "past_key_values") if name in parameters), None)
        self.prefix_cache = prefix_cache and self._cache_argument is not None

    @property
    def device(self) -> torch.device:
        for tensor in self.model.parameters():
            return tensor.device
        for tensor in self.model.buffers():
            return tensor.device
        return torch.device("cpu")

    # -------------------------------------------------------------- tokenization
    def encode(self, text: str, bos: bool = True) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return (self.bos if bos else []) + list(ids)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation token ids, split the way lm-eval-harness splits them."""
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole = self.encode(context + continuation)
        context_ids = self.encode(context)
        return context_ids, whole[len(context_ids):]

    # -------------------------------------------------------------- forward
    def _progress(self, total: int, desc: str):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, disable=not self.progress, unit="seq", leave=False, dynamic_ncols=True)

    def _batches(self, lengths: Sequence[int]) -> list[list[int]]:
        """Indices grouped longest-first into batches (little padding), each batch in that order."""
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        return [order[i: i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    def _last_logits(self, rows: Sequence[Sequence[int]], keep: int) -> torch.Tensor:
        """Float32 logits of the last ``keep`` positions of each (left-padded) row: ``[B, keep, V]``."""
        input_ids, mask = self._left_padded(rows)
        position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
        device = self.device
        kwargs = dict(input_ids=input_ids.to(device), attention_mask=mask.to(device), position_ids=position_ids.to(device))
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = keep
        logits = self.model(**kwargs).logits
        return logits[:, -keep:].float()

    def _left_padded(self, rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """``rows`` left-padded to one width: ``(input_ids, attention_mask)``, both ``[B, width]``."""
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, width - len(row):] = torch.as_tensor(row, dtype=torch.long)
            mask[i, width - len(row):] = 1
        return input_ids, mask

    def _prefix_cache(self, prefixes: Sequence[Sequence[int]]) -> tuple[Any, torch.Tensor] | None:
        """The model's KV cache after the left-padded ``prefixes`` (one row each) and their attention mask.

        ``None`` if the model returns no cache that can be copied and re-batched (then this scorer
        stops trying and scores every row in full).
        """
        input_ids, mask = self._left_padded(prefixes)
        position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
        device = self.device
        kwargs = dict(input_ids=input_ids.to(device), attention_mask=mask.to(device), position_ids=position_ids.to(device),
                      use_cache=True)
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = 1
        out = self.model(**kwargs)
        cache = getattr(out, "cache", None)
        if cache is None:
            cache = getattr(out, "past_key_values", None)  # transformers 4.x
        if (cache is None or not hasattr(cache, "batch_select_indices")
                or cache.get_seq_length() != input_ids.shape[1]):
            self.prefix_cache = False  # e.g. no cache or a legacy tuple cache: score every row in full from now on
            return None
        return cache, mask

    def _cached_last_logits(self, cache: Any, prefix_mask: torch.Tensor, prefix_lengths: Sequence[int],
                            groups: Sequence[int], suffixes: Sequence[Sequence[int]], keep: int) -> torch.Tensor:
        """Like :meth:`_last_logits` for rows ``prefix + suffix``, running only the suffixes on a copy of ``cache``.

        Row ``b`` continues prefix ``groups[b]`` of the cache (``prefix_lengths`` real tokens,
        left-padded to the cache's width as ``prefix_mask`` says). The suffixes are left-padded
        too, so every row's last token sits at the same index (the LM head still runs on
        ``keep`` positions only); each row's positions continue after its own prefix.
        """
        input_ids, suffix_mask = self._left_padded(suffixes)
        index = torch.as_tensor(list(groups), dtype=torch.long)
        lengths = torch.as_tensor([prefix_lengths[g] for g in groups], dtype=torch.long)
        position_ids = lengths[:, None] + (suffix_mask.cumsum(-1) - 1).clamp_min(0)
        mask = torch.cat([prefix_mask[index], suffix_mask], dim=-1)
        device = self.device
        rows_cache = copy.deepcopy(cache)  # the forward appends to the cache it is given; keep the prefixes intact
        rows_cache.batch_select_indices(index.to(device))
        kwargs = dict(input_ids=input_ids.to(device), attention_mask=mask.to(device), position_ids=position_ids.to(device),
                      use_cache=True)
        kwargs[self._cache_argument] = rows_cache
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = keep
        logits = self.model(**kwargs).logits
        return logits[:, -keep:].float()

    def _prefix_passes(self, groups: list[tuple[list[int], list[int]]]) -> list[list[tuple[list[int], list[int]]]]:
        """Groups in prefix passes of up to ``batch_size`` prefixes of similar length.

        Short prefixes (a zero-shot question) gain most from sharing a pass, since a forward over
        a few tokens costs mostly the pass itself; a prefix joins a pass only while padding the
        pass to its longest prefix adds at most ``PREFIX_PADDING_SLACK`` of its real tokens (long
        MMLU prefixes of different lengths would otherwise be padded, and attended, in vain).
        """
        passes: list[list[tuple[list[int], list[int]]]] = []
        real = 0
        for group in sorted(groups, key=lambda g: len(g[0])):
            current = passes[-1] if passes else None
            if (current is not None and len(current) < self.batch_size
                    and (len(current) + 1) * len(group[0]) <= (1 + PREFIX_PADDING_SLACK) * (real + len(group[0]))):
                current.append(group)
                real += len(group[0])
            else:
                passes.append([group])
                real = len(group[0])
        return passes

    def _run_rows(self, rows: Sequence[Sequence[int]], keeps: Sequence[int], prefixes: Sequence[Sequence[int]] | None,
                  desc: str, consume: Callable[[list[int], torch.Tensor], None]) -> None:
        """Run every row and hand each batch's ``[B, max keep, V]`` last-position logits to ``consume(indices, logits)``.

        With ``prefix_cache`` on and ``prefixes`` given, rows sharing a prefix (see
        :func:`shared_prefix_groups`) run on that prefix's cache: up to ``batch_size`` prefixes
        (similar lengths) run in one pass, then their rows' remainders in batches of
        ``batch_size``, rows of different prefixes mixed. The rest run in full.
        """
        if self.prefix_cache and prefixes is not None:
            groups, rest = shared_prefix_groups(rows, keeps, prefixes)
        else:
            groups, rest = [], list(range(len(rows)))
        was_training = self.model.training
        self.model.eval()
        with self._progress(len(rows), desc) as bar:
            for chunk in self._prefix_passes(groups):
                cached = self._prefix_cache([prefix for prefix, _ in chunk]) if self.prefix_cache else None
                if cached is None:
                    rest += [i for _, members in chunk for i in members]
                    continue
                cache, prefix_mask = cached
                prefix_lengths = [len(prefix) for prefix, _ in chunk]
                members = [(g, i) for g, (_, indices) in enumerate(chunk) for i in indices]
                suffixes = [rows[i][prefix_lengths[g]:] for g, i in members]
                for batch in self._batches([len(r) for r in suffixes]):
                    indices = [members[j][1] for j in batch]
                    logits = self._cached_last_logits(cache, prefix_mask, prefix_lengths, [members[j][0] for j in batch],
                                                      [suffixes[j] for j in batch], max(keeps[i] for i in indices))
                    consume(indices, logits)
                    bar.update(len(batch))
            for batch in self._batches([len(rows[i]) for i in rest]):
                indices = [rest[j] for j in batch]
                consume(indices, self._last_logits([rows[i] for i in indices], max(keeps[i] for i in indices)))
                bar.update(len(batch))
        self.model.train(was_training)

    @torch.inference_mode()
    def loglikelihoods(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]], desc: str = "loglikelihood",
                       prefixes: Sequence[Sequence[int]] | None = None) -> list[tuple[float, bool]]:
        """``(sum of log p(continuation | context), continuation is the greedy one)`` per request.

        ``prefixes`` hints which leading tokens requests share (default: each request's context,
        so the choices of one question share it); only used with ``prefix_cache``.
        """
        if prefixes is not None and len(prefixes) != len(requests):
            raise ValueError(f"{len(requests)} requests but {len(prefixes)} prefixes")
        inputs, spans, hints = [], [], []
        for n, (context, continuation) in enumerate(requests):
            if not continuation:
                raise ValueError(f"empty continuation after context {list(context)[-8:]}")
            if len(continuation) > self.max_length:
                raise ValueError(f"continuation of {len(continuation)} tokens exceeds max_length={self.max_length}")
            whole = (list(context) + list(continuation))[:-1]
            inputs.append(whole[-self.max_length:])
            spans.append(list(continuation))
            truncated = len(whole) > self.max_length
            hints.append([] if truncated else list(context if prefixes is None else prefixes[n]))
        results: list[tuple[float, bool] | None] = [None] * len(inputs)

        def consume(batch: list[int], logits: torch.Tensor) -> None:
            keep = logits.shape[1]
            logprobs = torch.log_softmax(logits, dim=-1)
            for b, i in enumerate(batch):
                target = torch.as_tensor(spans[i], device=logprobs.device)
                rows = logprobs[b, keep - len(target):]
                check_finite(rows, desc)
                chosen = rows.gather(-1, target[:, None]).squeeze(-1)
                greedy = bool((rows.argmax(-1) == target).all())
                results[i] = (float(chosen.sum()), greedy)

        self._run_rows(inputs, [len(s) for s in spans], hints, desc, consume)
        return results  # type: ignore[return-value]

    @torch.inference_mode()
    def next_token_logprobs(self, contexts: Sequence[Sequence[int]], candidates: Sequence[Sequence[int]],
                            desc: str = "next token", prefixes: Sequence[Sequence[int]] | None = None,
                            ) -> list[torch.Tensor]:
        """Log-probabilities (over the full vocabulary) of each row's candidate next tokens: one pass per context.

        ``prefixes`` hints which leading tokens contexts share (MMLU: the header and k shots of a
        subject); without it (or without ``prefix_cache``) every context runs in full.
        """
        if len(contexts) != len(candidates):
            raise ValueError(f"{len(contexts)} contexts but {len(candidates)} candidate lists")
        if prefixes is not None and len(prefixes) != len(contexts):
            raise ValueError(f"{len(contexts)} contexts but {len(prefixes)} prefixes")
        rows = [list(c)[-self.max_length:] for c in contexts]
        hints = None
        if prefixes is not None:
            hints = [[] if len(c) > self.max_length else list(p) for c, p in zip(contexts, prefixes)]
        results: list[torch.Tensor | None] = [None] * len(rows)

        def consume(batch: list[int], logits: torch.Tensor) -> None:
            logprobs = torch.log_softmax(logits[:, -1], dim=-1)
            check_finite(logprobs, desc)
            for b, i in enumerate(batch):
                results[i] = logprobs[b, torch.as_tensor(candidates[i], device=logprobs.device)].cpu()

        self._run_rows(rows, [1] * len(rows), hints, desc, consume)
        return results  # type: ignore[return-value]

    @torch.inference_mode()
    def token_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Full float32 logits of a right-padded ``{"input_ids", "attention_mask"}`` batch."""
        device = self.device
        mask = batch["attention_mask"].to(device)
        logits = self.model(input_ids=batch["input_ids"].to(device), attention_mask=mask).logits.float()
        check_finite(logits[mask.bool()], "token logits")
        return logits

    @torch.inference_mode()
    def greedy_generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                        desc: str = "generate", on_batch: Callable[[int], None] | None = None) -> list[list[int]]:
        """Greedy continuation ids of each prompt (stopping at EOS, which is not returned)."""
        rows = [list(p)[-(self.max_length - max_new_tokens):] for p in prompts]
        results: list[list[int] | None] = [None] * len(rows)
        was_training = self.model.training
        self.model.eval()
        device = self.device
        from transformers import LogitsProcessorList

        with self._progress(len(rows), desc) as bar:
            for batch in self._batches([len(r) for r in rows]):
                width = max(len(rows[i]) for i in batch)
                input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
                mask = torch.zeros_like(input_ids)
                for b, i in enumerate(batch):
                    input_ids[b, width - len(rows[i]):] = torch.as_tensor(rows[i])
                    mask[b, width - len(rows[i]):] = 1
                out = self.model.generate(
                    input_ids=input_ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                    do_sample=False, pad_token_id=self.pad_id, eos_token_id=self.eos_id,
                    logits_processor=LogitsProcessorList([_nan_guard_processor(desc)]),
                )
                for b, i in enumerate(batch):
                    new = out[b, width:].tolist()
                    if self.eos_id is not None and self.eos_id in new:
                        new = new[: new.index(self.eos_id)]
                    results[i] = new
                bar.update(len(batch))
        self.model.train(was_training)
        return results  # type: ignore[return-value]
