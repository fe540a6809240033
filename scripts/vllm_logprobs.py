"""Prompt log-probabilities of token-id prompts under vLLM, as JSON (run with vLLM's own Python).

    $VLLM_PYTHON scripts/vllm_logprobs.py --model EXPORT/compressed-tensors --prompts prompts.json --out vllm.json

``prompts.json`` is a list of token-id lists. For each prompt the output holds, per position ``t >= 1``,
``log p(prompt[t] | prompt[:t])`` and vLLM's greedy next token after the whole prompt. vLLM pins its own
torch / transformers, so it runs in its own environment; scripts/gpu_check.py calls this script there.
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--dtype", default="float16")
    args = parser.parse_args()

    from vllm import LLM, SamplingParams

    prompts = json.loads(open(args.prompts).read())
    llm = LLM(model=args.model, dtype=args.dtype, enforce_eager=True, gpu_memory_utilization=0.5,
              max_model_len=max(len(p) for p in prompts) + 8)
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1, logprobs=1)
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params)
    results = []
    for ids, output in zip(prompts, outputs):
        per_position = [output.prompt_logprobs[t][ids[t]].logprob for t in range(1, len(ids))]
        results.append({"prompt_logprobs": per_position, "greedy_next": output.outputs[0].token_ids[0]})
    with open(args.out, "w") as f:
        json.dump({"model": args.model, "dtype": args.dtype, "results": results}, f)


if __name__ == "__main__":
    main()
