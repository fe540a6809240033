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

Every logit that is read is checked: a model that produces NaN or infinite logits (diverged
weights, a broken export or quantization) raises :class:`NonFiniteLogitsError` instead of
reporting an accuracy - argmax over NaNs silently picks the first option, so an all-NaN model
would otherwise "score" the share of ``A`` answers.
"""

from __future__ import annotations

import inspect
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


class LanguageModelScorer:
    """Scores texts with ``model`` in batches of ``batch_size``; shows a tqdm bar per call.

    Args:
        model: a Hugging Face causal LM (adapted, merged or a native low-bit export).
        tokenizer: its tokenizer.
        batch_size: sequences per forward pass.
        max_length: longest input in tokens; default the model's ``max_position_embeddings``.
        progress: show progress bars (the suite turns them off on non-zero ranks).
    """

    def __init__(self, model: nn.Module, tokenizer: Any, batch_size: int = 8, max_length: int | None = None,
                 progress: bool = True) -> None:
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
        self._logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters

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
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, width - len(row):] = torch.as_tensor(row, dtype=torch.long)
            mask[i, width - len(row):] = 1
        position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
        device = self.device
        kwargs = dict(input_ids=input_ids.to(device), attention_mask=mask.to(device), position_ids=position_ids.to(device))
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = keep
        logits = self.model(**kwargs).logits
        return logits[:, -keep:].float()

    @torch.inference_mode()
    def loglikelihoods(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]], desc: str = "loglikelihood",
                       ) -> list[tuple[float, bool]]:
        """``(sum of log p(continuation | context), continuation is the greedy one)`` per request."""
        inputs, spans = [], []
        for context, continuation in requests:
            if not continuation:
                raise ValueError(f"empty continuation after context {list(context)[-8:]}")
            if len(continuation) > self.max_length:
                raise ValueError(f"continuation of {len(continuation)} tokens exceeds max_length={self.max_length}")
            row = (list(context) + list(continuation))[:-1][-self.max_length:]
            inputs.append(row)
            spans.append(list(continuation))
        results: list[tuple[float, bool] | None] = [None] * len(inputs)
        was_training = self.model.training
        self.model.eval()
        with self._progress(len(inputs), desc) as bar:
            for batch in self._batches([len(r) for r in inputs]):
                keep = max(len(spans[i]) for i in batch)
                logprobs = torch.log_softmax(self._last_logits([inputs[i] for i in batch], keep), dim=-1)
                for b, i in enumerate(batch):
                    target = torch.as_tensor(spans[i], device=logprobs.device)
                    rows = logprobs[b, keep - len(target):]
                    check_finite(rows, desc)
                    chosen = rows.gather(-1, target[:, None]).squeeze(-1)
                    greedy = bool((rows.argmax(-1) == target).all())
                    results[i] = (float(chosen.sum()), greedy)
                bar.update(len(batch))
        self.model.train(was_training)
        return results  # type: ignore[return-value]

    @torch.inference_mode()
    def next_token_logprobs(self, contexts: Sequence[Sequence[int]], candidates: Sequence[Sequence[int]],
                            desc: str = "next token") -> list[torch.Tensor]:
        """Log-probabilities (over the full vocabulary) of each row's candidate next tokens: one pass per context."""
        if len(contexts) != len(candidates):
            raise ValueError(f"{len(contexts)} contexts but {len(candidates)} candidate lists")
        rows = [list(c)[-self.max_length:] for c in contexts]
        results: list[torch.Tensor | None] = [None] * len(rows)
        was_training = self.model.training
        self.model.eval()
        with self._progress(len(rows), desc) as bar:
            for batch in self._batches([len(r) for r in rows]):
                logprobs = torch.log_softmax(self._last_logits([rows[i] for i in batch], 1)[:, -1], dim=-1)
                check_finite(logprobs, desc)
                for b, i in enumerate(batch):
                    results[i] = logprobs[b, torch.as_tensor(candidates[i], device=logprobs.device)].cpu()
                bar.update(len(batch))
        self.model.train(was_training)
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
