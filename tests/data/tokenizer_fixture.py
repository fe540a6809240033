"""A tiny byte-level BPE tokenizer built in-process, for tests that must not touch the network.

``build_tiny_tokenizer(directory)`` trains it on a few lines of Alpaca-like text, wraps it as a
``PreTrainedTokenizerFast`` with ``<s>`` (bos, prepended like Llama's), ``</s>`` (eos) and
``<unk>``, and saves it so ``AutoTokenizer.from_pretrained(directory)`` loads it. It has no pad
token, like Llama's. Byte-level BPE decodes any text exactly, so tests can compare decoded spans
with the source strings.
"""

from __future__ import annotations

from pathlib import Path

_CORPUS = [
    "Below is an instruction that describes a task, paired with an input that provides further context.",
    "Write a response that appropriately completes the request.",
    "### Instruction:\nGive three tips for staying healthy.\n\n### Input:\n\n### Response:\n",
    "Eat a balanced diet, exercise regularly and get enough sleep.",
    "Translate the sentence into French. The cat sits on the mat. Le chat est assis sur le tapis.",
    "What is the capital of France? The capital of France is Paris.",
    "Summarize the following text in one sentence. numbers 0 1 2 3 4 5 6 7 8 9",
]


def build_tiny_tokenizer(directory: str | Path, vocab_size: int = 400) -> Path:
    """Train, wrap and save the tiny tokenizer into ``directory``; return the directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    directory = Path(directory)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer)
    bos_id = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    wrapped.save_pretrained(directory)
    return directory
