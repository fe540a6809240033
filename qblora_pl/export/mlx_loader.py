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
    tokens alone; padding must be on the right (the positions after a row's last attended
    token get zero logits, which the comparisons mask out). No torch parameters: everything
    lives in MLX.
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
        rows = []
        for row, (row_ids, row_mask) in enumerate(zip(ids, mask)):
            length = int(row_mask.sum())
            if not bool(row_mask[:length].all()):
                raise ValueError(f"row {row}: attention_mask is not right-padded ({row_mask.tolist()}); "
                                 "the MLX client runs each row on its leading attended tokens")
            logits = torch.zeros(ids.shape[1], 0)
            if length:
                out = self.mlx_model(mx.array(row_ids[:length].numpy()[None].astype(np.int32)))
                logits = torch.from_numpy(np.array(out.astype(mx.float32))[0])
            rows.append(logits)
        vocab = max(r.shape[-1] for r in rows)
        batch = torch.zeros(ids.shape[0], ids.shape[1], vocab)
        for row, logits in enumerate(rows):
            batch[row, : logits.shape[0], : logits.shape[1]] = logits
        return MLXOutput(logits=batch)

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
