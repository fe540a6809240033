"""scripts/build_base_model.py end to end on a tiny corpus, and its corpus checks."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "build_base_model.py"


@pytest.fixture(scope="module")
def bbm():
    spec = importlib.util.spec_from_file_location("build_base_model", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("build_base_model", mod)
    spec.loader.exec_module(mod)
    return mod


WORDS = (
    "cat dog bird fish tree river stone house light water fire earth wind happy sad quick slow "
    "run walk see hear speak write read big small old new good bad warm cold early late"
).split()


def _tiny_corpus(path: Path, n_docs: int = 120, seed: int = 0) -> Path:
    rng = random.Random(seed)
    path.mkdir(parents=True, exist_ok=True)
    docs = []
    for i in range(n_docs):
        w = rng.choice(WORDS)
        syn = rng.sample(WORDS, 2)
        docs.append(f'The word "{w}" means {" ".join(rng.sample(WORDS, 6))}. Synonyms: {syn[0]}, {syn[1]}. Number {i}.')
    (path / "glosses.txt").write_text("\n\n".join(docs[:80]) + "\n", encoding="utf-8")
    (path / "prose.txt").write_text("\n\n".join("\n".join(docs[j : j + 4]) for j in range(80, n_docs, 4)), encoding="utf-8")
    return path


def test_build_end_to_end_tiny(bbm, tmp_path):
    corpus = _tiny_corpus(tmp_path / "corpus")
    out = tmp_path / "model"
    argv = [
        "--corpus-dir", str(corpus), "--out", str(out), "--vocab-size", "320",
        "--hidden-size", "128", "--intermediate-size", "256", "--layers", "1", "--heads", "2",
        "--seq-len", "32", "--batch-size", "2", "--steps", "3", "--warmup-steps", "1",
        "--heldout-permille", "100", "--sample-tokens", "3", "--threads", "1", "--quiet",
    ]  # fmt: skip
    assert bbm.main(argv) == 0
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert model.config.model_type == "llama" and model.config.hidden_size == 128
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    text = 'The word "cat" means bird.'
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text
    info = json.loads((out / "build_info.json").read_text())
    assert info["training"]["steps"] == 3
    assert info["seed"] == 0 and info["hardware"]["gpu_used"] is False
    assert info["eval"]["heldout_tokens"] > 0 and info["eval"]["unigram_baseline_perplexity"] > 1
    assert (out / "tokenizer.model").is_file() and (out / "model.safetensors").is_file()

    # re-running replaces the directory atomically and leaves no temp dirs behind
    first = (out / "model.safetensors").read_bytes()
    assert bbm.main(argv) == 0
    assert (out / "model.safetensors").read_bytes() == first  # seeded, step-based: identical
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "model"]


def test_save_failure_keeps_previous_model(bbm, tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "marker").write_text("old")

    class Broken:
        def save_pretrained(self, *a, **k):
            raise OSError("disk full")

    with pytest.raises(OSError):
        bbm.save_model_dir(Broken(), tmp_path, out, {})
    assert (out / "marker").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_missing_corpus_dir(bbm, tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(bbm.CorpusError, match=str(missing)):
        bbm.load_corpus(missing)


def test_corpus_without_txt_files(bbm, tmp_path):
    with pytest.raises(bbm.CorpusError, match="no \\*.txt"):
        bbm.load_corpus(tmp_path)


def test_empty_corpus(bbm, tmp_path):
    (tmp_path / "a.txt").write_text("\n\n   \n", encoding="utf-8")
    with pytest.raises(bbm.CorpusError, match="empty") as exc:
        bbm.load_corpus(tmp_path)
    assert str(tmp_path) in str(exc.value)


def test_non_utf8_corpus(bbm, tmp_path):
    (tmp_path / "good.txt").write_text("fine text", encoding="utf-8")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    with pytest.raises(bbm.CorpusError, match="not valid UTF-8") as exc:
        bbm.load_corpus(tmp_path)
    assert str(bad) in str(exc.value)


def test_main_reports_bad_corpus(bbm, tmp_path, capsys):
    assert bbm.main(["--corpus-dir", str(tmp_path / "missing"), "--out", str(tmp_path / "m"), "--quiet"]) == 2
    assert "corpus directory not found" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_cleaning_and_heldout_split(bbm, tmp_path):
    (tmp_path / "c.txt").write_text("a  b\t c\r\nline two  \n\n\n second\x00doc \n", encoding="utf-8")
    docs = bbm.load_corpus(tmp_path)
    assert docs == [("c", "a b c\nline two"), ("c", "second doc")]
    many = [("s", f"document number {i}") for i in range(2000)]
    train, test = bbm.split_documents(many, 20)
    assert 10 <= len(test) <= 80 and len(train) + len(test) == 2000
    assert bbm.split_documents(many, 20) == (train, test)  # stable, no RNG
    with pytest.raises(bbm.CorpusError, match="too small"):
        bbm.split_documents([d for d in many if not bbm.is_heldout(d[1], 20)][:3], 20)


def test_divisibility_is_enforced(bbm):
    with pytest.raises(SystemExit):
        bbm.parse_args(["--hidden-size", "200"])


def test_wordnet_line_parser(bbm):
    line = (
        "00021403 00 a 02 unaccommodating 0 unobliging 0 002 ! 00020787 a 0101 & 00021592 a 0000 | "
        'not accommodating; "the unaccommodating bus driver pulled out"  \n'
    )
    s = bbm.parse_wordnet_data_line(line)
    assert s.key == "a00021403" and s.pos_name == "adjective"
    assert s.words == ["unaccommodating", "unobliging"]
    assert s.definition == "not accommodating"
    assert s.examples == ["the unaccommodating bus driver pulled out"]
    assert s.antonyms == [(1, "a00020787", 1)] and s.similar == ["a00021592"]
