"""Run an MLX export with mlx-lm (the client) and hand its logits back as torch tensors.

:func:`load_mlx` loads a directory written by :func:`qblora_pl.export.mlx_writer.write_mlx`
with ``mlx_lm.load`` - mlx-lm's own reading of config.json, its quantized layers and
``mx.quantized_matmul`` - and wraps the model in :class:`MLXCausalLM`, a torch module whose
``forward(input_ids, attention_mask)`` returns ``.logits`` like a Hugging Face model, so the
exporter's verification (:func:`qblora_pl.export.verify.logits_and_perplexity`) treats it like
the other clients. Needs ``mlx`` and ``mlx-lm`` (``pip install -e ".[mlx]"``; on Linux MLX runs
on the CPU through the ``mlx-cpu`` package).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

MLX_CLIENT = "mlx_lm.load (MLX, CPU)"


@dataclass
class MLXOutput:
    logits: torch.Tensor


class MLXCausalLM(nn.Module):
    """A torch-facing view of an mlx-lm model: token ids in, float32 CPU logits out.

    mlx-lm's forward has a causal mask but no padding mask, so each row runs on its attended
    tokens alone, which must be one contiguous span (left or right padding). Padded positions get
    zero logits; the comparisons mask them out. For a left-padded row that matches a Hugging Face
    model up to rounding: RoPE attention depends only on relative positions. (A perplexity whose
    labels include a left-padded row's first token scores it from a pad position, where a torch
    model has arbitrary logits and this one zeros, so that one term differs.) No torch
    parameters: everything lives in MLX.
    """

    def __init__(self, model, tokenizer, path: str | Path) -> None:
        super().__init__()
        self.mlx_model = model
        self.tokenizer = tokenizer
        self.path = str(path)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: object) -> MLXOutput:
        import mlx.core as mx

        ids = input_ids.cpu()
        mask = torch.ones_like(ids) if attention_mask is None else attention_mask.cpu()
        spans = []
        for row, row_mask in enumerate(mask):
            attended = row_mask.nonzero().flatten()
            if len(attended) and int(attended[-1] - attended[0]) + 1 != len(attended):
                raise ValueError(f"row {row}: the attended tokens are not one contiguous span "
                                 f"(attention_mask {row_mask.tolist()}); the MLX client cannot run them")
            spans.append((int(attended[0]), int(attended[-1]) + 1) if len(attended) else (0, 0))
        logits = None
        for row, (start, end) in enumerate(spans):
            if start == end:
                continue
            out = self.mlx_model(mx.array(ids[row, start:end].numpy()[None].astype(np.int32)))
            row_logits = torch.from_numpy(np.array(out.astype(mx.float32))[0])
            if logits is None:
                logits = torch.zeros(*ids.shape, row_logits.shape[-1])
            logits[row, start:end] = row_logits
        if logits is None:
            raise ValueError("the batch has no attended tokens")
        return MLXOutput(logits=logits)

    def greedy_tokens(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        """mlx-lm's own greedy decoding (``generate_step`` with its KV cache, argmax sampling)."""
        import mlx.core as mx
        from mlx_lm.generate import generate_step

        tokens = []
        for token, _ in generate_step(mx.array(prompt_ids, dtype=mx.int32), self.mlx_model, max_tokens=max_new_tokens):
            tokens.append(int(token))
        return tokens


def load_mlx(path: str | Path) -> MLXCausalLM:
    """Load an MLX export with ``mlx_lm.load`` (model and tokenizer) for verification."""
    try:
        from mlx_lm import load
    except ImportError as err:
        raise ImportError(
            f"loading the MLX export {path} needs mlx and mlx-lm ({err}); install them with "
            "pip install -e '.[mlx]'"
        ) from err
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not an MLX export directory (no config.json)")
    model, tokenizer = load(str(path))
    return MLXCausalLM(model, tokenizer, path).eval()
