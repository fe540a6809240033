"""The tokenizer of a GGUF export: vocabulary, merges, special ids and the settings llama.cpp reads.

The tokenizer settings llama.cpp needs beyond the vocabulary (``tokenizer.ggml.pre``, add-BOS /
add-EOS, the chat template) come from the source ``.gguf`` file when the model was converted
from one (:func:`qblora_pl.sources.converted_from_gguf`), else they are derived from the Hugging
Face tokenizer as ``convert_hf_to_gguf.py`` does (:func:`tokenizer_settings`). A llama
SentencePiece model is written as llama.cpp's ``llama`` tokenizer, a byte-level BPE
``tokenizer.json`` as its ``gpt2`` tokenizer (:func:`_add_vocab`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from qblora_pl.export.tokenizer_files import sentencepiece_model_path

#: The text llama.cpp's ``convert_hf_to_gguf.py`` (``get_vocab_base_pre``) tokenizes to recognize
#: a byte-level BPE pre-tokenizer: sha256 of ``str(tokenizer.encode(text))`` names it.
BPE_FINGERPRINT_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) "
    "✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you "
    "sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
#: Fingerprints of a few common Llama-architecture tokenizers (values from ``convert_hf_to_gguf.py``).
KNOWN_BPE_PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Meta-Llama-3
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # openai-community/gpt2
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM / SmolLM2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5 / Qwen2
}
#: The tokenizer keys carried over from a source GGUF file (llama.cpp reads them at load time).
CARRIED_TOKENIZER_KEYS = {
    "pre": "tokenizer.ggml.pre",
    "add_bos": "tokenizer.ggml.add_bos_token",
    "add_eos": "tokenizer.ggml.add_eos_token",
    "add_space_prefix": "tokenizer.ggml.add_space_prefix",
    "chat_template": "tokenizer.chat_template",
}


def bpe_pre_tokenizer(tokenizer) -> tuple[str | None, str]:
    """llama.cpp's name for a Hugging Face BPE tokenizer's pre-tokenizer and its fingerprint
    (``convert_hf_to_gguf.py``'s method); the name is None when the fingerprint is unknown."""
    import hashlib

    fingerprint = hashlib.sha256(str(tokenizer.encode(BPE_FINGERPRINT_TEXT)).encode()).hexdigest()
    return KNOWN_BPE_PRE_TOKENIZERS.get(fingerprint), fingerprint


def tokenizer_settings(tokenizer_source: str | Path, tokenizer_model: Literal["gpt2", "llama"]) -> dict[str, Any]:
    """What llama.cpp needs besides the vocabulary: ``pre``, ``add_bos``, ``add_eos``,
    ``add_space_prefix`` (None: not written) and ``chat_template``, plus ``origin``.

    A directory converted from a ``.gguf`` file takes them from that file, so llama.cpp
    tokenizes the export as it tokenized the source. Otherwise they are derived like
    ``convert_hf_to_gguf.py``: ``pre`` from the BPE fingerprint (``"default"`` for
    SentencePiece and unknown fingerprints), add-BOS / add-EOS from ``tokenizer_config.json``
    or else from what the Hugging Face tokenizer does to a text, the chat template from
    ``tokenizer_config.json`` / ``chat_template.jinja``.
    """
    from qblora_pl.sources import converted_from_gguf

    source_gguf = converted_from_gguf(tokenizer_source)
    if source_gguf is not None:
        settings = _settings_from_gguf(source_gguf, tokenizer_model)
        if settings is not None:
            return settings
    return _derived_settings(Path(tokenizer_source), tokenizer_model)


def _settings_from_gguf(path: Path, tokenizer_model: str) -> dict[str, Any] | None:
    import gguf

    reader = gguf.GGUFReader(str(path))
    model_field = reader.get_field("tokenizer.ggml.model")
    if model_field is None or model_field.contents() != tokenizer_model:
        return None  # another tokenizer kind than the one we write: its settings would not apply
    settings: dict[str, Any] = {"origin": f"source GGUF {path}"}
    for name, key in CARRIED_TOKENIZER_KEYS.items():
        field = reader.get_field(key)
        settings[name] = None if field is None else field.contents()
    settings["pre"] = settings["pre"] or "default"
    return settings


def _derived_settings(directory: Path, tokenizer_model: str) -> dict[str, Any]:
    config_file = directory / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    template = config.get("chat_template")
    if template is None and (directory / "chat_template.jinja").is_file():
        template = (directory / "chat_template.jinja").read_text()
    settings: dict[str, Any] = {"origin": f"derived from {directory}", "chat_template": template}
    if tokenizer_model == "llama":
        # SentencePiece llamas: llama.cpp's default pre-tokenizer, BOS added unless configured off,
        # the space prefix of the SentencePiece model (convert_hf_to_gguf.py).
        spm_path = sentencepiece_model_path(directory)
        settings.update(
            pre="default",
            add_bos=bool(config.get("add_bos_token", True)),
            add_eos=bool(config.get("add_eos_token", False)),
            add_space_prefix=_spm_adds_dummy_prefix(spm_path) if spm_path is not None else None,
        )
        return settings

    from qblora_pl.sources import load_tokenizer

    tokenizer = load_tokenizer(str(directory))
    name, fingerprint = bpe_pre_tokenizer(tokenizer)
    if name is None:
        settings["origin"] += f" (BPE pre-tokenizer fingerprint {fingerprint[:12]} not recognized: 'default')"
    # What the tokenizer does to a text decides add-BOS / add-EOS unless the config states them.
    ids = tokenizer("a")["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    settings.update(
        pre=name or "default",
        pre_fingerprint=fingerprint,
        add_bos=bool(config.get("add_bos_token", bos is not None and ids[:1] == [bos])),
        add_eos=bool(config.get("add_eos_token", eos is not None and len(ids) > 1 and ids[-1] == eos)),
        add_space_prefix=None,
    )
    return settings


def _add_vocab(writer, tokenizer_source: str | Path, vocab_size: int) -> dict[str, Any]:
    """Write the tokenizer: llama's SentencePiece model if there is one, else a byte-level BPE."""
    spm_path = sentencepiece_model_path(tokenizer_source)
    if spm_path is not None:
        return _add_sentencepiece_vocab(writer, spm_path, Path(tokenizer_source), vocab_size)
    tokenizer_json = Path(tokenizer_source) / "tokenizer.json"
    if tokenizer_json.is_file():
        return _add_bpe_vocab(writer, tokenizer_json, vocab_size)
    raise FileNotFoundError(
        f"GGUF export needs the tokenizer: no tokenizer.model or tokenizer.json in {tokenizer_source!s}"
    )


def _write_settings(writer, settings: dict[str, Any]) -> dict[str, Any]:
    """Write the flags and chat template of :func:`tokenizer_settings`; return them for the report."""
    if settings["add_bos"] is not None:
        writer.add_add_bos_token(bool(settings["add_bos"]))
    if settings["add_eos"] is not None:
        writer.add_add_eos_token(bool(settings["add_eos"]))
    if settings["add_space_prefix"] is not None:
        writer.add_add_space_prefix(bool(settings["add_space_prefix"]))
    if settings["chat_template"]:
        writer.add_chat_template(settings["chat_template"])
    return {
        "settings_from": settings["origin"],
        "pre": settings["pre"],
        "add_bos": settings["add_bos"],
        "add_eos": settings["add_eos"],
        "chat_template": bool(settings["chat_template"]),
    }


def _add_sentencepiece_vocab(writer, spm_path: Path, source_dir: Path, vocab_size: int) -> dict[str, Any]:
    """Tokens, scores and types as in ``convert_hf_to_gguf.py``'s ``_create_vocab_sentencepiece``."""
    import gguf
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor(model_file=str(spm_path))
    n_sp = sp.vocab_size()
    if n_sp > vocab_size:
        raise ValueError(f"tokenizer.model has {n_sp} pieces but the model's vocab_size is {vocab_size}")
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [gguf.TokenType.UNUSED] * vocab_size
    for i in range(n_sp):
        tokens[i] = sp.id_to_piece(i).encode("utf-8")
        scores[i] = sp.get_score(i)
        if sp.is_unknown(i):
            types[i] = gguf.TokenType.UNKNOWN
        elif sp.is_control(i):
            types[i] = gguf.TokenType.CONTROL
        elif sp.is_unused(i):
            types[i] = gguf.TokenType.UNUSED
        elif sp.is_byte(i):
            types[i] = gguf.TokenType.BYTE
        else:
            types[i] = gguf.TokenType.NORMAL
    # Tokens the HF tokenizer added on top of the SentencePiece model (ids >= n_sp).
    config_file = source_dir / "tokenizer_config.json"
    tokenizer_config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    for token_id, token in (tokenizer_config.get("added_tokens_decoder") or {}).items():
        token_id = int(token_id)
        if n_sp <= token_id < vocab_size:
            tokens[token_id] = token["content"].encode("utf-8")
            scores[token_id] = -1000.0
            types[token_id] = gguf.TokenType.CONTROL if token.get("special") else gguf.TokenType.USER_DEFINED

    settings = tokenizer_settings(source_dir, "llama")
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre(settings["pre"])
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    special = {"bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id(), "pad": sp.pad_id()}
    special = {k: v for k, v in special.items() if v >= 0}
    setters = {
        "bos": writer.add_bos_token_id,
        "eos": writer.add_eos_token_id,
        "unk": writer.add_unk_token_id,
        "pad": writer.add_pad_token_id,
    }
    for kind, token_id in special.items():
        setters[kind](token_id)
    written = _write_settings(writer, settings)
    return {"type": "llama (SentencePiece)", "pieces": n_sp, "padded_to": vocab_size, "special_ids": special, **written}


def _spm_adds_dummy_prefix(spm_path: Path) -> bool:
    try:
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(spm_path.read_bytes())
        return bool(proto.normalizer_spec.add_dummy_prefix)
    except Exception:  # protobuf missing: SentencePiece's own default
        return True


def _add_bpe_vocab(writer, tokenizer_json: Path, vocab_size: int) -> dict[str, Any]:
    """A byte-level BPE ``tokenizer.json`` as llama.cpp's ``gpt2`` tokenizer model."""
    import gguf

    spec = json.loads(tokenizer_json.read_text())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise NotImplementedError(f"{tokenizer_json}: tokenizer model {model.get('type')!r} cannot be written to GGUF")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for token, token_id in model["vocab"].items():
        if token_id < vocab_size:
            tokens[token_id], types[token_id] = token, gguf.TokenType.NORMAL
    for added in spec.get("added_tokens", []):
        if added["id"] < vocab_size:
            tokens[added["id"]] = added["content"]
            types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    settings = tokenizer_settings(tokenizer_json.parent, "gpt2")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(settings["pre"])
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    special = gguf.SpecialVocab(tokenizer_json.parent, load_merges=False, n_vocab=vocab_size)
    special.add_special_token.clear()  # add-BOS / add-EOS come from the settings (one source of truth)
    special.chat_template = None
    special.add_to_gguf(writer, quiet=True)
    written = _write_settings(writer, settings)
    return {"type": "gpt2 (byte-level BPE)", "pieces": len(model["vocab"]), "padded_to": vocab_size,
            "special_ids": dict(special.special_token_ids), **written}
