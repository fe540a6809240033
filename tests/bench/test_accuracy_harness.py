"""bench/accuracy.py's one-pass exact match is greedy decoding's exact match."""

from __future__ import annotations

import math

import torch

from bench.accuracy_lib.evaluation import score


def _batch_from(prompts: torch.Tensor, responses: torch.Tensor) -> dict[str, torch.Tensor]:
    input_ids = torch.cat([prompts, responses], dim=1)
    labels = input_ids.clone()
    labels[:, : prompts.size(1)] = -100
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def test_teacher_forced_exact_match_equals_greedy_generation(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    torch.manual_seed(0)
    prompts = torch.randint(3, model.config.vocab_size, (4, 6))
    generated = model.generate(
        input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=5, min_new_tokens=5,
        do_sample=False, pad_token_id=0,
    )[:, prompts.size(1):]
    assert generated.shape == (4, 5)

    # The greedy continuation is an exact match for every record ...
    assert score(model, [_batch_from(prompts, generated)])["exact_match"] == 1.0
    # ... and changing one response token of two records makes exactly those two miss.
    wrong = generated.clone()
    wrong[0, -1] = (wrong[0, -1] + 1) % model.config.vocab_size
    wrong[2, 0] = (wrong[2, 0] + 1) % model.config.vocab_size
    result = score(model, [_batch_from(prompts, wrong)])
    assert result["exact_match"] == 0.5
    assert result["records"] == 4


def test_loss_is_token_weighted_cross_entropy(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    torch.manual_seed(1)
    prompts, responses = torch.randint(3, 50, (2, 4)), torch.randint(3, 50, (2, 3))
    batch = _batch_from(prompts, responses)
    batch["labels"][1, -2:] = -100  # second record: one response token scored
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=batch["input_ids"]).logits.float(), -1)
    picked = [-logp[0, 3 + i, responses[0, i]] for i in range(3)] + [-logp[1, 3, responses[1, 0]]]
    expected = float(sum(picked) / 4)
    assert math.isclose(score(model, [batch])["loss"], expected, rel_tol=1e-5)
