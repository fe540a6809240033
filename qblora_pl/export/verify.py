"""Load every export back with an independent client and compare it with the in-memory model.

Each exported model runs one validation batch; we record the largest absolute logit difference
from the in-memory merged model, the share of positions whose greedy (argmax) token agrees, and
both perplexities (response tokens only when the batch has ``labels``). The clients:

* native: :func:`qblora_pl.quantization.native_checkpoint.load_native`;
* hf: ``AutoModelForCausalLM.from_pretrained`` (computed in float32, so only the weight rounding
  to ``dense_dtype`` shows);
* gguf: transformers' GGUF loader (``from_pretrained(dir, gguf_file=...)``, which dequantizes
  Q4_1 with ``gguf.quants`` and undoes the q/k permutation); if it fails, the ``gguf``
  package's reader with the same dequantization and our own inverse permutation.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qblora_pl.export.gguf_tensors import llama_unpermute_rows

IGNORE_INDEX = -100


def fixed_token_batch(vocab_size: int, batch_size: int = 2, seq_len: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    """A deterministic batch of token ids (used when no validation data is at hand)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (batch_size, seq_len), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


SAMPLE_TEXTS = (
    "The cat sat on the mat and looked at the door.",
    "In the beginning God created the heaven and the earth.",
    "A dog is a domesticated animal that is often kept as a pet.",
    "Water is a clear liquid that falls as rain and fills the seas and rivers.",
)


def text_batch(tokenizer_source: str | Path, texts: tuple[str, ...] = SAMPLE_TEXTS) -> dict[str, torch.Tensor]:
    """A few fixed English sentences tokenized by the model's own tokenizer (pads masked out)."""
    from qblora_pl.sources import load_tokenizer

    tokenizer = load_tokenizer(str(tokenizer_source))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    encoded = tokenizer(list(texts), padding=True, return_tensors="pt")
    labels = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, IGNORE_INDEX)
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"], "labels": labels}


def validation_batch(
    trainer: Any, vocab_size: int, tokenizer_source: str | Path | None = None, max_sequences: int = 8
) -> tuple[dict[str, torch.Tensor], str]:
    """The first batch of the trainer's val dataloader; else :data:`SAMPLE_TEXTS` tokenized by
    the model's tokenizer; else :func:`fixed_token_batch`. Returns the batch and its source."""
    datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
    if datamodule is not None:
        try:
            batch = next(iter(datamodule.val_dataloader()))
            batch = {k: v[:max_sequences] for k, v in batch.items() if isinstance(v, torch.Tensor)}
            if "input_ids" in batch:
                return batch, "val_dataloader"
        except Exception:  # no val split, not set up: fall back to fixed text
            pass
    if tokenizer_source is not None:
        try:
            batch = text_batch(tokenizer_source)
            if int(batch["input_ids"].max()) < vocab_size:
                return batch, "sample_texts"
        except Exception:  # no loadable tokenizer: fixed tokens
            pass
    return fixed_token_batch(vocab_size), "fixed_tokens"


@torch.no_grad()
def logits_and_perplexity(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, float]:
    """Float32 CPU logits of ``batch`` and the perplexity of its labels (next-token, -100 ignored)."""
    device = next(model.parameters(), torch.empty(0)).device
    was_training = model.training
    model.eval()
    try:
        inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask") if k in batch}
        logits = model(**inputs).logits.float().cpu()
    finally:
        model.train(was_training)
    labels = batch.get("labels", batch["input_ids"]).cpu()
    if "labels" not in batch and "attention_mask" in batch:
        labels = labels.masked_fill(batch["attention_mask"].cpu() == 0, IGNORE_INDEX)
    loss = nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
    )
    return logits, math.exp(float(loss))


def compare_logits(reference: torch.Tensor, other: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """Max |logit difference| and argmax agreement over the batch's attended positions."""
    mask = batch.get("attention_mask", torch.ones(reference.shape[:2], dtype=torch.long)).cpu().bool()
    diff = (reference - other).abs().amax(dim=-1)[mask]
    agree = (reference.argmax(-1) == other.argmax(-1))[mask].float()
    return {"max_abs_logit_diff": float(diff.max()), "argmax_agreement": float(agree.mean())}


def load_hf_dense(path: str | Path) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def load_gguf(path: str | Path) -> tuple[nn.Module, str]:
    """Load a GGUF export as a float32 HF model; returns the model and the client that loaded it."""
    path = Path(path)
    try:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        return model.eval(), "transformers GGUF loader"
    except Exception as err:  # noqa: BLE001 - any failure: try the second client, keep the reason
        model = load_gguf_with_reader(path)
        return model, f"gguf.GGUFReader + gguf.quants.dequantize (transformers failed: {type(err).__name__}: {err})"


@torch.no_grad()
def load_gguf_with_reader(path: str | Path) -> nn.Module:
    """A float32 ``LlamaForCausalLM`` from a llama GGUF file through the ``gguf`` package alone."""
    import gguf
    from transformers import LlamaConfig, LlamaForCausalLM

    reader = gguf.GGUFReader(str(path))

    def field(key: str, default=None):
        f = reader.get_field(key)
        return default if f is None else f.contents()

    n_layers = field("llama.block_count")
    n_head = field("llama.attention.head_count")
    n_head_kv = field("llama.attention.head_count_kv", n_head)
    tensors = {t.name: t for t in reader.tensors}
    config = LlamaConfig(
        vocab_size=field("llama.vocab_size") or len(field("tokenizer.ggml.tokens")),
        hidden_size=field("llama.embedding_length"),
        intermediate_size=field("llama.feed_forward_length"),
        num_hidden_layers=n_layers,
        num_attention_heads=n_head,
        num_key_value_heads=n_head_kv,
        max_position_embeddings=field("llama.context_length"),
        rms_norm_eps=field("llama.attention.layer_norm_rms_epsilon"),
        rope_theta=field("llama.rope.freq_base", 10000.0),
        tie_word_embeddings="output.weight" not in tensors,
    )
    model = LlamaForCausalLM(config).float().eval()
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    state = {}
    for hf_key in model.state_dict():
        gname = name_map.get_name(hf_key, try_suffixes=(".weight", ".bias"))
        if gname not in tensors:
            continue
        t = tensors[gname]
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        data = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).astype("float32").reshape(shape))
        if ".attn_q." in gname:
            data = llama_unpermute_rows(data, n_head, n_head)
        elif ".attn_k." in gname:
            data = llama_unpermute_rows(data, n_head, n_head_kv)
        state[hf_key] = data
    missing, unexpected = model.load_state_dict(state, strict=False)
    if set(missing) - ({"lm_head.weight"} if config.tie_word_embeddings else set()):
        raise RuntimeError(f"{path}: tensors missing from the GGUF file: {missing}")
    return model


@contextmanager
def _default_model_params(**fields):
    """llama-cpp-python's ``Llama`` takes no argument for some model fields; set them on the defaults it reads."""
    import llama_cpp

    module = llama_cpp.llama_cpp
    original = module.llama_model_default_params

    def defaults():
        params = original()
        for name, value in fields.items():
            setattr(params, name, value)
        return params

    module.llama_model_default_params = defaults
    try:
        yield
    finally:
        module.llama_model_default_params = original


def open_llama_cpp(path: str | Path, *, extra_buffer_types: bool = False, **kwargs: Any):
    """A ``llama_cpp.Llama`` for a GGUF file, by default on llama.cpp's plain CPU kernels.

    ``extra_buffer_types=False`` keeps the weights out of llama.cpp's "extra" buffer types (the AMX
    and CPU_REPACK layouts, ``use_extra_bufts``): on CPUs with AMX-INT8 the AMX matmul segfaults on
    small models (seen in CI on our Q4_1 exports; llama.cpp issue #20824), and the plain kernels are
    the reference a check should compare with. Pass ``True`` to measure llama.cpp's fastest path.
    """
    import llama_cpp

    with _default_model_params(use_extra_bufts=extra_buffer_types):
        return llama_cpp.Llama(model_path=str(path), **kwargs)


def llama_cpp_logits(path: str | Path, prompts_ids: list[list[int]], threads: int = 1, n_ctx: int = 512) -> list:
    """llama.cpp's float32 ``(len(ids), vocab)`` logits for each prompt of a GGUF file (llama-cpp-python)."""
    import numpy as np

    llm = open_llama_cpp(path, n_ctx=n_ctx, logits_all=True, n_threads=threads, verbose=False)
    try:
        out = []
        for ids in prompts_ids:
            llm.reset()
            llm.eval(ids)
            out.append(np.array(llm.scores[: len(ids)], dtype=np.float32, copy=True))
        return out
    finally:
        llm.close()
