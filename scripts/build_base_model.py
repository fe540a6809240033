#!/usr/bin/env python
"""Build the small pretrained Llama model shipped in ``qblora_pl/assets/tiny-llama``.

End to end, offline, seeded:

1. ``prepare`` (optional, ``--prepare-corpus``): render a plain-text corpus from two
   Debian packages into ``--corpus-dir``:

   * ``wordnet-base`` (WordNet 3.0 database, ``/usr/share/wordnet``): one short
     dictionary-style paragraph per synset (words, part of speech, definition,
     synonyms, antonyms, "a kind of" hypernym, usage examples). Only synsets with at
     least one sense-tagged word (``cntlist.rev``) are used by default: they are the
     common senses, and the embedded instruction dataset asks about them.
   * ``bible-kjv`` + ``bible-kjv-text`` (King James Version, public domain): one
     paragraph per chapter, as running English prose.

   Install them with::

       apt-get update && apt-get install -y wordnet-base bible-kjv bible-kjv-text

2. ``load_corpus`` + ``split_documents``: read every ``*.txt`` file of ``--corpus-dir``
   (UTF-8, documents separated by blank lines), clean it, and hold out a fixed share of
   the documents (chosen by a hash of their text, so the choice is stable and needs no
   RNG) as a test set that is never trained on.
3. ``train_tokenizer``: a LLaMA-style SentencePiece BPE model (byte fallback, split
   digits, no normalisation, unk=0 / bos=1 / eos=2, no pad) saved both as
   ``tokenizer.model`` and as Hugging Face tokenizer files.
4. ``pretrain``: a ``LlamaForCausalLM`` trained from scratch with AdamW and a warm-up +
   cosine schedule on random windows of the packed token stream; the number of steps
   is either given (``--steps``) or calibrated from the measured step time so that the
   run fits in ``--max-minutes``.
5. ``save_model_dir``: config, safetensors weights, tokenizer and ``build_info.json``
   written to a temporary directory next to ``--out``, then renamed over it.

Nothing runs at import time; ``main()`` is the command-line entry point.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "qblora_pl" / "assets" / "tiny-llama"
DEFAULT_CORPUS_DIR = REPO_ROOT / "build" / "corpus"
DEFAULT_WORDNET_DIR = Path("/usr/share/wordnet")
APT_PACKAGES = ("wordnet-base", "bible-kjv", "bible-kjv-text")

POS_NAMES = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}
# ss_type numbers used in WordNet sense keys (cntlist.rev)
SS_TYPE_NUM = {"n": 1, "v": 2, "a": 3, "r": 4, "s": 5}
DATA_FILES = {"n": "data.noun", "v": "data.verb", "a": "data.adj", "r": "data.adv"}


class CorpusError(ValueError):
    """The corpus is missing, empty or unreadable; the message names the path."""


# ---------------------------------------------------------------------------
# WordNet
# ---------------------------------------------------------------------------
@dataclass
class Synset:
    key: str  # file pos letter (n/v/a/r) + 8-digit offset, e.g. "n02084071"
    pos: str  # n, v, a, s, r
    lex_filenum: int
    words: list[str]  # display form, spaces instead of underscores
    lex_ids: list[int]
    definition: str
    examples: list[str]
    hypernyms: list[str] = field(default_factory=list)  # synset keys
    similar: list[str] = field(default_factory=list)  # '&' (satellite -> head)
    antonyms: list[tuple[int, str, int]] = field(default_factory=list)  # (src word, key, tgt word)
    count: int = 0  # sum of the sense-tag counts of its words
    word_counts: list[int] = field(default_factory=list)

    @property
    def pos_name(self) -> str:
        return POS_NAMES[self.pos]


def _synset_key(pos: str, offset: str) -> str:
    return ("a" if pos == "s" else pos) + offset


def _clean_word(word: str) -> str:
    word = re.sub(r"\((a|p|ip)\)$", "", word)  # adjective position markers
    return word.replace("_", " ")


def _split_gloss(gloss: str) -> tuple[str, list[str]]:
    examples = re.findall(r'"([^"]+)"', gloss)
    definition = re.sub(r'"[^"]*"', "", gloss)
    definition = re.sub(r"\s*;\s*(;\s*)*", "; ", definition).strip(" ;")
    definition = re.sub(r"\s+", " ", definition).strip()
    examples = [re.sub(r"\s+", " ", e).strip() for e in examples if e.strip()]
    return definition, examples


def parse_wordnet_data_line(line: str) -> Synset:
    head, _, gloss = line.partition(" | ")
    f = head.split()
    offset, lex_filenum, ss_type = f[0], int(f[1]), f[2]
    w_cnt = int(f[3], 16)
    i = 4
    words, lex_ids = [], []
    for _ in range(w_cnt):
        words.append(_clean_word(f[i]))
        lex_ids.append(int(f[i + 1], 16))
        i += 2
    p_cnt = int(f[i])
    i += 1
    syn = Synset(
        key=_synset_key(ss_type, offset),
        pos=ss_type,
        lex_filenum=lex_filenum,
        words=words,
        lex_ids=lex_ids,
        definition="",
        examples=[],
    )
    for _ in range(p_cnt):
        sym, tgt_off, tgt_pos, st = f[i], f[i + 1], f[i + 2], f[i + 3]
        i += 4
        tkey = _synset_key(tgt_pos, tgt_off)
        if sym in ("@", "@i"):
            syn.hypernyms.append(tkey)
        elif sym == "&":
            syn.similar.append(tkey)
        elif sym == "!":
            syn.antonyms.append((int(st[:2], 16), tkey, int(st[2:], 16)))
    syn.definition, syn.examples = _split_gloss(gloss.strip())
    return syn


def parse_wordnet(wordnet_dir: str | Path = DEFAULT_WORDNET_DIR) -> dict[str, Synset]:
    """Parse the four ``data.*`` files of a WordNet 3.0 database into synsets.

    Sense-tag counts from ``cntlist.rev`` (when present) are attached to every word.
    """
    wordnet_dir = Path(wordnet_dir)
    if not (wordnet_dir / "data.noun").is_file():
        raise CorpusError(
            f"WordNet database not found in {wordnet_dir} (expected {wordnet_dir / 'data.noun'}); "
            f"install it with: apt-get install -y wordnet-base"
        )
    synsets: dict[str, Synset] = {}
    for pos, name in DATA_FILES.items():
        with open(wordnet_dir / name, encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("  ") or not line.strip():
                    continue  # license header
                syn = parse_wordnet_data_line(line)
                synsets[syn.key] = syn
    # sense-tag counts: key "lemma%ss_type:lex_filenum:lex_id:head_word:head_id"
    counts: dict[tuple, int] = {}
    cnt_file = wordnet_dir / "cntlist.rev"
    if cnt_file.is_file():
        with open(cnt_file, encoding="utf-8") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) != 3:
                    continue
                lemma, rest = parts[0].split("%", 1)
                ss, lexf, lexid, headw, _ = rest.split(":")
                counts[(lemma.lower(), int(ss), int(lexf), int(lexid), headw.lower())] = int(parts[2])
    for syn in synsets.values():
        head = ""
        if syn.pos == "s" and syn.similar and syn.similar[0] in synsets:
            head = synsets[syn.similar[0]].words[0].replace(" ", "_").lower()
        syn.word_counts = []
        for w, lid in zip(syn.words, syn.lex_ids):
            k = (w.replace(" ", "_").lower(), SS_TYPE_NUM[syn.pos], syn.lex_filenum, lid, head)
            syn.word_counts.append(counts.get(k, 0))
        syn.count = sum(syn.word_counts)
    return synsets


def synset_antonym_pairs(syn: Synset, synsets: dict[str, Synset]) -> list[tuple[str, str]]:
    pairs = []
    for src, tkey, tgt in syn.antonyms:
        other = synsets.get(tkey)
        if other is None or src < 1 or tgt < 1 or src > len(syn.words) or tgt > len(other.words):
            continue
        pairs.append((syn.words[src - 1], other.words[tgt - 1]))
    return pairs


def render_synset(syn: Synset, synsets: dict[str, Synset]) -> str:
    """One dictionary-style paragraph; the template is chosen by the synset offset."""
    w = syn.words[0]
    pos = syn.pos_name
    others = syn.words[1:]
    ants = synset_antonym_pairs(syn, synsets)
    hyper = next((synsets[k].words[0] for k in syn.hypernyms if k in synsets), None)
    variant = int(syn.key[1:]) % 3
    parts = []
    if variant == 0:
        parts.append(f"{w} ({pos}): {syn.definition}.")
        if others:
            parts.append(f"Synonyms: {', '.join(others)}.")
        for a, b in ants:
            parts.append(f"Antonym of {a}: {b}.")
        if hyper:
            parts.append(f"A kind of {hyper}.")
        for ex in syn.examples[:2]:
            parts.append(f'Example: "{ex}".')
    elif variant == 1:
        parts.append(f'The {pos} "{w}" means {syn.definition}.')
        if others:
            parts.append(f"Other words for it: {', '.join(others)}.")
        for a, b in ants:
            parts.append(f"The opposite of {a} is {b}.")
        if hyper:
            parts.append(f"It is a kind of {hyper}.")
        for ex in syn.examples[:2]:
            parts.append(f'For example: "{ex}".')
    else:
        parts.append(f"{w[:1].upper() + w[1:]} is a {pos} meaning {syn.definition}.")
        if others:
            parts.append(f"It is also called {', '.join(others)}.")
        for a, b in ants:
            parts.append(f"{a[:1].upper() + a[1:]} is the opposite of {b}.")
        if hyper:
            parts.append(f"{w[:1].upper() + w[1:]} is a kind of {hyper}.")
        for ex in syn.examples[:2]:
            parts.append(f'As in: "{ex}".')
    return " ".join(parts)


def select_synsets(synsets: dict[str, Synset], min_count: int = 1) -> list[Synset]:
    """Synsets with at least ``min_count`` sense-tagged occurrences, in file order."""
    return [s for s in synsets.values() if s.count >= min_count]


def render_wordnet_corpus(wordnet_dir: str | Path = DEFAULT_WORDNET_DIR, min_count: int = 1) -> list[str]:
    synsets = parse_wordnet(wordnet_dir)
    return [render_synset(s, synsets) for s in select_synsets(synsets, min_count)]


DEFAULT_KJV_RANGE = "mat1:1-rev22:21"  # the New Testament (~1 MB of text)


def render_kjv_corpus(verse_range: str = DEFAULT_KJV_RANGE, bible_cmd: str = "bible") -> list[str]:
    """The King James Bible (``verse_range``): one document per chapter, its title then one
    verse per line (verse numbers removed)."""
    exe = shutil.which(bible_cmd)
    if exe is None:
        raise CorpusError(
            f"'{bible_cmd}' not found; install it with: apt-get install -y bible-kjv bible-kjv-text"
        )
    out = subprocess.run(
        [exe, verse_range], check=True, capture_output=True, env={**os.environ, "COLUMNS": "100000"}
    ).stdout.decode("utf-8")
    chapters: list[str] = []
    title, verses = None, []
    for line in out.splitlines():
        s = line.strip()
        if not s:
            continue
        m = re.match(r"^(\d+)\s+(.*)$", s)
        if line.startswith(" ") and m:
            verses.append(m.group(2))
        elif not line.startswith(" ") and re.match(r"^[1-3]?\s?[A-Z][A-Za-z ]+ \d+$", s):
            if title and verses:
                chapters.append(title + "\n" + "\n".join(verses))
            title, verses = s, []
        elif verses:  # wrapped continuation of a verse
            verses[-1] += " " + s
    if title and verses:
        chapters.append(title + "\n" + "\n".join(verses))
    return chapters


def prepare_corpus(
    corpus_dir: str | Path,
    wordnet_dir: str | Path = DEFAULT_WORDNET_DIR,
    min_count: int = 1,
    with_kjv: bool = True,
    kjv_range: str = DEFAULT_KJV_RANGE,
) -> dict[str, int]:
    """Write ``wordnet.txt`` (and ``kjv.txt``) into ``corpus_dir``; returns document counts."""
    corpus_dir = Path(corpus_dir)
    corpus_dir.mkdir(parents=True, exist_ok=True)
    stats = {}
    docs = render_wordnet_corpus(wordnet_dir, min_count)
    (corpus_dir / "wordnet.txt").write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    stats["wordnet"] = len(docs)
    if with_kjv:
        docs = render_kjv_corpus(kjv_range)
        (corpus_dir / "kjv.txt").write_text("\n\n".join(docs) + "\n", encoding="utf-8")
        stats["kjv"] = len(docs)
    return stats


# ---------------------------------------------------------------------------
# Corpus loading, cleaning, held-out split
# ---------------------------------------------------------------------------
_CTRL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def clean_text(text: str) -> str:
    """NFC, control characters -> space, runs of spaces collapsed; single newlines kept."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n")
    text = _CTRL.sub(" ", text)
    text = re.sub(r"[ \t\r\f\v]+", " ", text)
    text = re.sub(r" *\n[ \n]*", "\n", text)
    return text.strip()


def load_corpus(corpus_dir: str | Path) -> list[tuple[str, str]]:
    """Read ``corpus_dir/*.txt`` -> list of ``(source, document)``.

    Documents are separated by blank lines. Raises :class:`CorpusError` (naming the
    path) when the directory is missing, holds no ``.txt`` file, holds only empty
    files, or a file is not valid UTF-8.
    """
    corpus_dir = Path(corpus_dir)
    if not corpus_dir.is_dir():
        raise CorpusError(f"corpus directory not found: {corpus_dir}")
    files = sorted(corpus_dir.glob("*.txt"))
    if not files:
        raise CorpusError(f"corpus directory {corpus_dir} contains no *.txt files")
    docs: list[tuple[str, str]] = []
    for path in files:
        try:
            raw = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CorpusError(f"corpus file {path} is not valid UTF-8 ({exc})") from exc
        for block in re.split(r"\n\s*\n", raw):
            text = clean_text(block)
            if text:
                docs.append((path.stem, text))
    if not docs:
        raise CorpusError(f"corpus directory {corpus_dir} is empty (no text in {', '.join(str(f) for f in files)})")
    return docs


def is_heldout(text: str, heldout_permille: int) -> bool:
    """Stable choice of held-out documents: a hash of the cleaned text (no RNG)."""
    h = int.from_bytes(hashlib.md5(text.encode("utf-8")).digest()[:4], "little")
    return h % 1000 < heldout_permille


def split_documents(docs: list[tuple[str, str]], heldout_permille: int = 20):
    train = [d for d in docs if not is_heldout(d[1], heldout_permille)]
    test = [d for d in docs if is_heldout(d[1], heldout_permille)]
    if not train or not test:
        raise CorpusError(
            f"corpus too small to hold out {heldout_permille / 10:.1f}% for testing "
            f"({len(train)} train / {len(test)} test documents)"
        )
    return train, test


# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------
def _chunks_for_spm(text: str, max_len: int = 3000):
    while len(text) > max_len:
        cut = text.rfind(" ", 0, max_len)
        cut = cut if cut > 0 else max_len
        yield text[:cut]
        text = text[cut:].lstrip()
    if text:
        yield text


def train_tokenizer(
    texts: list[str], out_dir: str | Path, vocab_size: int = 4096, seed: int = 0, model_max_length: int = 512
):
    """Train a LLaMA-style SentencePiece BPE model and save HF tokenizer files in ``out_dir``.

    Returns the loaded Hugging Face tokenizer. ``out_dir`` gets ``tokenizer.model``,
    ``tokenizer.json`` and ``tokenizer_config.json``.
    """
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as td:
        inp = Path(td) / "spm_input.txt"
        with open(inp, "w", encoding="utf-8") as fh:
            for t in texts:
                for c in (c for line in t.split("\n") for c in _chunks_for_spm(line)):
                    fh.write(c + "\n")
        if hasattr(spm, "set_random_generator_seed"):
            spm.set_random_generator_seed(seed)  # input shuffling
        spm.SentencePieceTrainer.train(
            input=str(inp),
            model_prefix=str(Path(td) / "tokenizer"),
            model_type="bpe",
            vocab_size=vocab_size,
            character_coverage=1.0,
            byte_fallback=True,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            remove_extra_whitespaces=False,
            normalization_rule_name="identity",
            add_dummy_prefix=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            unk_piece="<unk>",
            bos_piece="<s>",
            eos_piece="</s>",
            max_sentence_length=16384,
            input_sentence_size=2_000_000,
            shuffle_input_sentence=True,
            num_threads=1,
            minloglevel=2,
        )
        shutil.copy(Path(td) / "tokenizer.model", out_dir / "tokenizer.model")
    # transformers 5 converts the SentencePiece model to a `tokenizers` BPE on load
    # (LLaMA behaviour: <s> prepended, no </s> appended).
    tok = LlamaTokenizer.from_pretrained(
        str(out_dir),
        legacy=False,
        add_prefix_space=True,
        add_bos_token=True,
        add_eos_token=False,
        model_max_length=model_max_length,
    )
    tok.save_pretrained(out_dir)
    # save_pretrained may not copy the sentencepiece file: keep ours
    if not (out_dir / "tokenizer.model").is_file():
        raise RuntimeError("tokenizer.model missing after save_pretrained")
    return load_tokenizer(out_dir)


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def check_tokenizer(tok, spm_model: str | Path, samples: list[str]) -> None:
    """HF tokenizer ids must equal SentencePiece's, and decode must roundtrip."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    assert sp.unk_id() == 0 and sp.bos_id() == 1 and sp.eos_id() == 2, "unk/bos/eos must be 0/1/2"
    assert tok.bos_token_id == 1 and tok.eos_token_id == 2 and tok.unk_token_id == 0
    assert tok("a")["input_ids"][0] == 1, "the tokenizer must prepend <s> like LLaMA's"
    for s in samples:
        ids = tok.encode(s, add_special_tokens=False)
        sp_ids = sp.encode(s)
        if ids != sp_ids:
            raise AssertionError(f"HF and SentencePiece disagree on {s!r}: {ids[:20]} vs {sp_ids[:20]}")
        dec = tok.decode(ids)
        if dec != s:
            raise AssertionError(f"decode(encode(x)) != x for {s!r}: {dec!r}")


# ---------------------------------------------------------------------------
# Model + training
# ---------------------------------------------------------------------------
@dataclass
class ModelShape:
    hidden_size: int = 256
    intermediate_size: int = 768
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    max_position_embeddings: int = 512
    tie_word_embeddings: bool = False


def make_config(shape: ModelShape, vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_attention_heads,
        max_position_embeddings=shape.max_position_embeddings,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        hidden_act="silu",
        initializer_range=0.02,
        tie_word_embeddings=shape.tie_word_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
        attention_bias=False,
        mlp_bias=False,
    )


def tokenize_docs(tok, docs: list[tuple[str, str]]):
    """Pack documents as ``<s> doc </s>`` into one int32 stream; also per-source streams."""
    import torch

    bos, eos = tok.bos_token_id, tok.eos_token_id
    all_ids: list[int] = []
    per_source: dict[str, list[int]] = {}
    batch = 512
    for i in range(0, len(docs), batch):
        chunk = docs[i : i + batch]
        enc = tok([t for _, t in chunk], add_special_tokens=False, verbose=False)["input_ids"]
        for (src, _), ids in zip(chunk, enc):
            seq = [bos, *ids, eos]
            all_ids.extend(seq)
            per_source.setdefault(src, []).extend(seq)
    return torch.tensor(all_ids, dtype=torch.long), {k: torch.tensor(v, dtype=torch.long) for k, v in per_source.items()}


def evaluate_nll(model, stream, seq_len: int, batch_size: int = 8) -> tuple[float, int]:
    """Mean next-token NLL over non-overlapping windows of ``stream``; returns (nll, n_tokens)."""
    import torch

    n = (stream.numel() // seq_len) * seq_len
    if n == 0:
        seq_len, n = stream.numel(), stream.numel()
    windows = stream[:n].view(-1, seq_len)
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, windows.size(0), batch_size):
            x = windows[i : i + batch_size]
            logits = model(input_ids=x).logits[:, :-1].float()
            tgt = x[:, 1:]
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), tgt.reshape(-1), reduction="sum")
            total += nll.item()
            count += tgt.numel()
    model.train()
    return total / max(count, 1), count


def unigram_nll(train_stream, test_stream, seq_len: int, vocab_size: int) -> float:
    """NLL of an add-one unigram model (train counts) on the same targets as ``evaluate_nll``."""
    import torch

    counts = torch.bincount(train_stream, minlength=vocab_size).double() + 1.0
    logp = torch.log(counts / counts.sum())
    n = (test_stream.numel() // seq_len) * seq_len
    if n == 0:
        seq_len, n = test_stream.numel(), test_stream.numel()
    tgt = test_stream[:n].view(-1, seq_len)[:, 1:].reshape(-1)
    return float(-logp[tgt].mean())


@dataclass
class TrainResult:
    steps: int
    tokens_seen: int
    wall_s: float
    final_train_loss: float
    stopped_by_time: bool
    log: list[dict]


def pretrain(
    model,
    stream,
    *,
    seq_len: int,
    batch_size: int,
    lr: float,
    min_lr_ratio: float = 0.1,
    warmup_steps: int = 100,
    weight_decay: float = 0.1,
    steps: int | None = None,
    max_minutes: float = 35.0,
    seed: int = 0,
    log_every: int = 25,
    log_fn=print,
) -> TrainResult:
    """AdamW + linear warm-up + cosine decay on random windows of ``stream``.

    With ``steps`` given the cosine runs over steps (reproducible, bit for bit on the
    same machine/threads); with ``steps=None`` it runs over wall-clock time and training
    ends after ``max_minutes`` (the step count then depends on the machine's speed and
    load and is recorded). In both cases training stops at ``max_minutes``.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    budget_s = max_minutes * 60.0
    t0 = time.time()
    warm_end = [None]  # wall time at the end of warm-up (time-based schedule)

    def lr_at(step: int) -> float:
        if step < warmup_steps:
            return lr * (step + 1) / warmup_steps
        if steps is not None:  # step-based cosine: reproducible
            prog = (step - warmup_steps) / max(1, steps - warmup_steps)
        else:  # wall-clock cosine: robust to a shared, varying CPU
            if warm_end[0] is None:
                warm_end[0] = time.time() - t0
            prog = (time.time() - t0 - warm_end[0]) / max(1e-6, budget_s - warm_end[0])
        prog = min(1.0, max(0.0, prog))
        return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * prog)))

    max_start = stream.numel() - seq_len - 1
    if max_start < 1:
        raise CorpusError(f"training corpus too small for seq_len={seq_len} ({stream.numel()} tokens)")
    model.train()
    log, step, ema, stopped_by_time = [], 0, None, False
    while steps is None or step < steps:
        if time.time() - t0 > budget_s:
            stopped_by_time = steps is not None
            break
        cur_lr = lr_at(step)
        for gr in opt.param_groups:
            gr["lr"] = cur_lr
        starts = torch.randint(0, max_start, (batch_size,), generator=g)
        x = torch.stack([stream[s : s + seq_len] for s in starts.tolist()])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        lv = loss.item()
        ema = lv if ema is None else 0.95 * ema + 0.05 * lv
        if step % log_every == 0 or step == 1:
            rec = {"step": step, "loss": round(lv, 4), "loss_ema": round(ema, 4), "lr": cur_lr, "elapsed_s": round(time.time() - t0, 1)}
            log.append(rec)
            log_fn(json.dumps(rec))
    return TrainResult(step, step * batch_size * seq_len, time.time() - t0, float(ema or float("nan")), stopped_by_time, log)


def generate_samples(model, tok, prompts: list[str], max_new_tokens: int = 40, seed: int = 0) -> list[dict]:
    import torch

    out = []
    model.eval()
    for p in prompts:
        ids = tok(p, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            g = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
            torch.manual_seed(seed)
            s = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=True, temperature=0.8, top_k=40, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
        out.append(
            {
                "prompt": p,
                "greedy": tok.decode(g[0, ids.size(1) :], skip_special_tokens=True),
                "sampled_t0.8_top40": tok.decode(s[0, ids.size(1) :], skip_special_tokens=True),
            }
        )
    return out


def dir_size_bytes(path: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


WORDNET_NOTICE = """WordNet 3.0 Copyright 2006 by Princeton University. All rights reserved.

THIS SOFTWARE AND DATABASE IS PROVIDED "AS IS" AND PRINCETON UNIVERSITY MAKES NO
REPRESENTATIONS OR WARRANTIES, EXPRESS OR IMPLIED. BY WAY OF EXAMPLE, BUT NOT
LIMITATION, PRINCETON UNIVERSITY MAKES NO REPRESENTATIONS OR WARRANTIES OF
MERCHANTABILITY OR FITNESS FOR ANY PARTICULAR PURPOSE OR THAT THE USE OF THE LICENSED
SOFTWARE, DATABASE OR DOCUMENTATION WILL NOT INFRINGE ANY THIRD PARTY PATENTS,
COPYRIGHTS, TRADEMARKS OR OTHER RIGHTS. The name of Princeton University or Princeton
may not be used in advertising or publicity pertaining to distribution of the software
and/or database. Title to copyright in this software, database and any associated
documentation shall at all times remain with Princeton University."""


def model_card(info: dict) -> str:
    m, ev, tr = info.get("model", {}), info.get("eval", {}), info.get("training", {})
    return f"""# tiny-llama (embedded base model)

A {m.get("parameters", 0) / 1e6:.1f}M-parameter `LlamaForCausalLM` ({m.get("num_hidden_layers")} layers, hidden
{m.get("hidden_size")}, intermediate {m.get("intermediate_size")}, {m.get("num_attention_heads")} heads, vocab
{m.get("vocab_size")}, context {m.get("max_position_embeddings")}) pretrained from scratch on CPU by
`scripts/build_base_model.py` ({tr.get("steps")} steps). Held-out perplexity
{ev.get("heldout_perplexity")} (unigram baseline {ev.get("unigram_baseline_perplexity")}). Full
record: `build_info.json`; how to rebuild: `docs/embedded_model.md`.

Tokenizer: SentencePiece BPE (`tokenizer.model`, byte fallback, split digits,
unk=0 bos=1 eos=2, no pad token: pad with eos and mask it) plus the Hugging Face files.

Training text: WordNet 3.0 glosses (Debian `wordnet-base`) and the King James New
Testament (Debian `bible-kjv-text`, public domain). WordNet notice:

{WORDNET_NOTICE}
"""


def save_model_dir(model, tok_dir: str | Path, out: str | Path, build_info: dict) -> Path:
    """Write model + tokenizer + build_info.json to a temp dir, then rename it over ``out``."""
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    old = None
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        model.generation_config.save_pretrained(tmp)
        for f in Path(tok_dir).iterdir():
            if f.is_file():
                shutil.copy(f, tmp / f.name)
        build_info = dict(build_info)
        (tmp / "README.md").write_text(model_card(build_info), encoding="utf-8")
        build_info["files"] = {f.name: f.stat().st_size for f in sorted(tmp.iterdir())}
        build_info["total_size_bytes"] = sum(build_info["files"].values())
        (tmp / "build_info.json").write_text(json.dumps(build_info, indent=2) + "\n", encoding="utf-8")
        os.chmod(tmp, 0o755)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.rename(out, old)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists() and not out.exists():
            os.rename(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out


TOKENIZER_CHECKS = [
    "Hello, world! 12345 café ☃",
    "Below is an instruction that describes a task.\n\n### Instruction:\nGive a synonym of happy.\n\n### Response:\nglad",
    "double  spaces,\ttab and trailing space ",
]

SAMPLE_PROMPTS = [
    'The noun "dog" means',
    "happy (adjective):",
    "And Jesus said unto them,",
]


def build(args) -> dict:
    """The whole pipeline from an already prepared corpus dir; returns build_info."""
    import torch
    from transformers import LlamaForCausalLM

    t_start = time.time()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    log = print if not args.quiet else (lambda *a, **k: None)

    docs = load_corpus(args.corpus_dir)
    train_docs, test_docs = split_documents(docs, args.heldout_permille)
    sources = sorted({s for s, _ in docs})
    log(f"corpus: {len(docs)} documents ({len(train_docs)} train / {len(test_docs)} held out) from {sources}")

    with tempfile.TemporaryDirectory() as tok_dir:
        tok = train_tokenizer(
            [t for _, t in train_docs],
            tok_dir,
            vocab_size=args.vocab_size,
            seed=args.seed,
            model_max_length=args.max_position_embeddings,
        )
        check_tokenizer(tok, Path(tok_dir) / "tokenizer.model", [t for _, t in test_docs[:50]] + TOKENIZER_CHECKS)
        train_stream, train_src = tokenize_docs(tok, train_docs)
        test_stream, test_src = tokenize_docs(tok, test_docs)
        log(f"tokens: train {train_stream.numel()}, held-out {test_stream.numel()}")

        shape = ModelShape(
            hidden_size=args.hidden_size,
            intermediate_size=args.intermediate_size,
            num_hidden_layers=args.layers,
            num_attention_heads=args.heads,
            max_position_embeddings=args.max_position_embeddings,
            tie_word_embeddings=args.tie_embeddings,
        )
        config = make_config(shape, len(tok))
        torch.manual_seed(args.seed)
        model = LlamaForCausalLM(config)
        model.generation_config.bos_token_id = 1
        model.generation_config.eos_token_id = 2
        n_params = sum(p.numel() for p in model.parameters())
        log(f"model: {n_params / 1e6:.2f}M parameters, {shape}")

        res = pretrain(
            model,
            train_stream,
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            lr=args.lr,
            warmup_steps=args.warmup_steps,
            steps=args.steps,
            max_minutes=args.max_minutes,
            seed=args.seed,
            log_every=args.log_every,
            log_fn=log,
        )
        log(f"trained {res.steps} steps in {res.wall_s:.0f}s")

        eval_len = min(args.seq_len, args.max_position_embeddings)
        nll, n_eval = evaluate_nll(model, test_stream, eval_len)
        uni = unigram_nll(train_stream, test_stream, eval_len, len(tok))
        per_source = {}
        for src, st in test_src.items():
            s_nll, s_n = evaluate_nll(model, st, eval_len)
            per_source[src] = {
                "tokens": s_n,
                "perplexity": round(math.exp(s_nll), 3),
                "unigram_perplexity": round(math.exp(unigram_nll(train_stream, st, eval_len, len(tok))), 3),
            }
        log(f"held-out ppl {math.exp(nll):.2f} vs unigram {math.exp(uni):.2f}")
        samples = generate_samples(model, tok, SAMPLE_PROMPTS, max_new_tokens=args.sample_tokens, seed=args.seed)

        info = {
            "description": "Tiny LLaMA-architecture causal LM pretrained from scratch on CPU by scripts/build_base_model.py",
            "corpus": {
                "dir": str(args.corpus_dir),
                "sources": {
                    "wordnet": "WordNet 3.0 (Debian package wordnet-base), one dictionary paragraph per synset with >=1 sense-tagged word",
                    "kjv": "King James Bible, New Testament by default (Debian packages bible-kjv + bible-kjv-text), one paragraph per chapter",
                },
                "documents": {"total": len(docs), "train": len(train_docs), "heldout": len(test_docs)},
                "documents_by_source": {s: sum(1 for d in docs if d[0] == s) for s in sources},
                "characters": {"train": sum(len(t) for _, t in train_docs), "heldout": sum(len(t) for _, t in test_docs)},
                "heldout_rule": f"md5(cleaned document text)[:4] as little-endian int % 1000 < {args.heldout_permille}",
            },
            "tokenizer": {
                "type": "SentencePiece BPE (LLaMA-style: byte_fallback, split_digits, identity normalisation, dummy prefix)",
                "vocab_size": len(tok),
                "special_ids": {"unk": 0, "bos": 1, "eos": 2, "pad": None},
                "pad_note": "no pad token (as LLaMA); pad with eos (or unk) and mask it",
            },
            "tokens": {
                "train": int(train_stream.numel()),
                "heldout": int(test_stream.numel()),
                "train_by_source": {k: int(v.numel()) for k, v in train_src.items()},
                "seen_in_training": res.tokens_seen,
                "epochs_equivalent": round(res.tokens_seen / max(1, train_stream.numel()), 3),
            },
            "model": {**shape.__dict__, "vocab_size": len(tok), "parameters": n_params, "dtype": "float32"},
            "training": {
                "steps": res.steps,
                "batch_size": args.batch_size,
                "seq_len": args.seq_len,
                "lr": args.lr,
                "schedule": f"linear warm-up {args.warmup_steps} steps, then cosine to 10% of lr over "
                + ("steps" if args.steps else f"wall-clock time ({args.max_minutes} min)"),
                "optimizer": "AdamW(betas=(0.9, 0.95), weight_decay=0.1 on matrices), grad clip 1.0",
                "final_train_loss_ema": round(res.final_train_loss, 4),
                "stopped_by_time": res.stopped_by_time,
                "train_wall_time_s": round(res.wall_s, 1),
                "log": res.log,
            },
            "eval": {
                "heldout_tokens": n_eval,
                "heldout_perplexity": round(math.exp(nll), 3),
                "unigram_baseline_perplexity": round(math.exp(uni), 3),
                "window": eval_len,
                "by_source": per_source,
            },
            "samples": samples,
            "hardware": {
                "cpu_count": os.cpu_count(),
                "torch_threads": torch.get_num_threads(),
                "processor": platform.processor() or platform.machine(),
                "gpu_used": False,
                "torch_version": torch.__version__,
                "python": platform.python_version(),
            },
            "seed": args.seed,
            "command_line": " ".join([Path(sys.argv[0]).name if sys.argv else "build_base_model.py", *sys.argv[1:]]),
        }
        try:
            import transformers

            info["hardware"]["transformers_version"] = transformers.__version__
        except Exception:  # pragma: no cover
            pass
        info["total_wall_time_s"] = round(time.time() - t_start, 1)
        out = save_model_dir(model, tok_dir, args.out, info)
    size = dir_size_bytes(out)
    if size > args.max_size_mb * 1e6:
        raise RuntimeError(f"model dir {out} is {size / 1e6:.1f} MB > {args.max_size_mb} MB")
    log(f"saved {out} ({size / 1e6:.1f} MB)")
    return info


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--corpus-dir", type=Path, default=DEFAULT_CORPUS_DIR, help="directory of *.txt files (blank-line separated documents)")
    p.add_argument("--prepare-corpus", action="store_true", help="first render WordNet + KJV from the Debian packages into --corpus-dir")
    p.add_argument("--wordnet-dir", type=Path, default=DEFAULT_WORDNET_DIR)
    p.add_argument("--min-tag-count", type=int, default=1, help="keep WordNet synsets with at least this many sense-tagged occurrences")
    p.add_argument("--no-kjv", action="store_true", help="with --prepare-corpus: WordNet only")
    p.add_argument("--kjv-range", default=DEFAULT_KJV_RANGE, help="verse range given to the `bible` program")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--heldout-permille", type=int, default=20, help="share of documents held out for testing, per mille")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--intermediate-size", type=int, default=768)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--max-position-embeddings", type=int, default=512)
    p.add_argument("--tie-embeddings", action="store_true")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--steps", type=int, default=None, help="fixed number of steps, step-based cosine (default: wall-clock cosine over --max-minutes)")
    p.add_argument("--max-minutes", type=float, default=35.0, help="wall-clock budget of the training loop")
    p.add_argument("--threads", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--sample-tokens", type=int, default=40)
    p.add_argument("--max-size-mb", type=float, default=30.0)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    for name, v in (("hidden-size", args.hidden_size), ("intermediate-size", args.intermediate_size)):
        if v % 128:
            p.error(f"--{name} must be divisible by 128 (group sizes 32/64/128, pooling 2/4)")
    if args.hidden_size % args.heads:
        p.error("--hidden-size must be divisible by --heads")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.prepare_corpus:
        stats = prepare_corpus(args.corpus_dir, args.wordnet_dir, args.min_tag_count, with_kjv=not args.no_kjv, kjv_range=args.kjv_range)
        print(f"prepared corpus in {args.corpus_dir}: {stats}")
    try:
        build(args)
    except CorpusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
