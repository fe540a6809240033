"""Greedy generation of responses for instruction batches (used by ``predict``)."""

from __future__ import annotations

import torch


@torch.no_grad()
def prompt_lengths(labels: torch.Tensor, attention_mask: torch.Tensor) -> list[int]:
    """Length of each row's prompt: the tokens before its first response (non -100) label.

    Rows whose labels are all -100 (or that train on the source too) fall back to the whole
    unpadded row.
    """
    lengths = []
    for row_labels, row_mask in zip(labels, attention_mask):
        seq_len = int(row_mask.sum())
        response = (row_labels[:seq_len] != -100).nonzero()
        first = int(response[0]) if len(response) else seq_len
        lengths.append(first if 0 < first < seq_len else seq_len)
    return lengths


@torch.no_grad()
def generate_responses(model, batch: dict[str, torch.Tensor], tokenizer, max_new_tokens: int = 64) -> list[str]:
    """Greedy-decode a response for each row's prompt; returns the decoded texts."""
    was_training = model.training
    model.eval()
    texts = []
    for ids, length in zip(batch["input_ids"], prompt_lengths(batch["labels"], batch["attention_mask"])):
        prompt = ids[:length].unsqueeze(0)
        out = model.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        texts.append(tokenizer.decode(out[0, length:], skip_special_tokens=True).strip())
    model.train(was_training)
    return texts
