"""Ask a model questions through its chat template (greedy decoding).

    python scripts/chat.py --model runs/qablora/version_0/exports/native "What is the capital of France?" "Name three primary colors."
    python scripts/chat.py --model $(python scripts/fetch_smollm2.py --quiet) "What is 2 + 2?"

``--model`` is a merged native low-bit export (``MergeExport``'s ``native`` dir, loaded with
:func:`qblora_pl.quantization.native_checkpoint.load_native`: the INT-b weights as trained), a ``.gguf`` file, a
Hugging Face model directory or a hub name. Prints each question and the model's answer.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def load(model_path: str):
    from qblora_pl.quantization.native_checkpoint import is_native_export, load_native
    from qblora_pl.sources import load_causal_lm, load_tokenizer

    if is_native_export(model_path):
        return load_native(model_path).eval(), load_tokenizer(model_path)
    return load_causal_lm(model_path, dtype=torch.float32).eval(), load_tokenizer(model_path)


@torch.no_grad()
def answer(model, tokenizer, question: str, max_new_tokens: int = 64, system: str | None = None) -> str:
    if not tokenizer.chat_template:
        raise ValueError("the tokenizer has no chat template; this script asks chat models")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("questions", nargs="+")
    parser.add_argument("--model", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--system", default=None, help="a system message (default: the template's own)")
    args = parser.parse_args(argv)
    model, tokenizer = load(args.model)
    for question in args.questions:
        print(f"Q: {question}\nA: {answer(model, tokenizer, question, args.max_new_tokens, args.system)}\n", flush=True)


if __name__ == "__main__":
    main()
