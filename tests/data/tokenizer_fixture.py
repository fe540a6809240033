"""A tiny byte-level BPE tokenizer built in-process, for tests that must not touch the network.

``build_tiny_tokenizer(directory)`` trains it on a few lines of Alpaca-like text, wraps it as a
``PreTrainedTokenizerFast`` with ``<s>`` (bos, prepended like Llama's), ``</s>`` (eos) and
``<unk>``, and saves it so ``AutoTokenizer.from_pretrained(directory)`` loads it. It has no pad
token, like Llama's. Byte-level BPE decodes any text exactly, so tests can compare decoded spans
with the source strings.

``build_tiny_chat_tokenizer(directory)`` is the same tokenizer with ChatML's special tokens
(``<|im_start|>``, ``<|im_end|>``, the latter also eos, as in SmolLM2) and a ChatML chat template
like SmolLM2's (without its default system prompt), for ``prompt_template: chat`` tests.
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


CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_tiny_chat_tokenizer(directory: str | Path, chat_template: str = CHATML_TEMPLATE) -> Path:
    """The tiny tokenizer with ChatML special tokens, ``<|im_end|>`` as eos and ``chat_template``."""
    return build_tiny_tokenizer(directory, extra_special_tokens=["<|im_start|>", "<|im_end|>"],
                                eos_token="<|im_end|>", chat_template=chat_template)


def build_tiny_tokenizer(directory: str | Path, vocab_size: int = 400, extra_special_tokens: list[str] = (),
                         eos_token: str = "</s>", chat_template: str | None = None) -> Path:
    """Train, wrap and save the tiny tokenizer into ``directory``; return the directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    directory = Path(directory)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", *extra_special_tokens],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer)
    bos_id = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token=eos_token,
                                      unk_token="<unk>")
    if extra_special_tokens:
        wrapped.add_special_tokens({"additional_special_tokens": list(extra_special_tokens)})
    if chat_template is not None:
        wrapped.chat_template = chat_template
    wrapped.save_pretrained(directory)
    return directory
