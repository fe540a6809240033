"""The pretrained model and datasets shipped in qblora_pl/assets load offline and are sane."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

from qblora_pl.paths import EMBEDDED_DATA_DIR, EMBEDDED_MODEL_DIR

MAX_MODEL_BYTES = 30 * 1024 * 1024


@pytest.fixture(scope="module")
def build_info() -> dict:
    return json.loads((EMBEDDED_MODEL_DIR / "build_info.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(EMBEDDED_MODEL_DIR), local_files_only=True)


@pytest.fixture(scope="module")
def model():
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(EMBEDDED_MODEL_DIR), local_files_only=True, dtype=torch.float32)
    m.eval()
    return m


def test_files_present_and_small():
    for name in ("config.json", "model.safetensors", "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "build_info.json"):
        assert (EMBEDDED_MODEL_DIR / name).is_file(), name
    size = sum(f.stat().st_size for f in EMBEDDED_MODEL_DIR.rglob("*") if f.is_file())
    assert size <= MAX_MODEL_BYTES, f"{size / 2**20:.1f} MiB"
    # no leftovers of an interrupted build next to it
    assert not [p for p in EMBEDDED_MODEL_DIR.parent.iterdir() if p.name.startswith(".tiny-llama.")]


def test_config_matches_build_info(model, build_info):
    cfg = model.config
    rec = build_info["model"]
    assert cfg.model_type == "llama"
    assert type(model).__name__ == "LlamaForCausalLM"
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings", "vocab_size"):
        assert getattr(cfg, key) == rec[key], key
    assert sum(p.numel() for p in model.parameters()) == rec["parameters"]
    # every method's group sizes (32/64/128) and pooling factors (2/4) divide the widths
    for width in (cfg.hidden_size, cfg.intermediate_size):
        assert width % 128 == 0
        for g in (2, 4, 32, 64, 128):
            assert width % g == 0
    assert cfg.bos_token_id == 1 and cfg.eos_token_id == 2


def test_build_info_records_the_run(build_info):
    for key in ("corpus", "tokens", "training", "eval", "hardware", "seed", "command_line", "samples"):
        assert key in build_info, key
    ev = build_info["eval"]
    assert ev["heldout_perplexity"] < ev["unigram_baseline_perplexity"]
    assert build_info["hardware"]["gpu_used"] is False
    assert build_info["training"]["steps"] > 0


def test_tokenizer_special_ids_and_roundtrip(tokenizer, model):
    assert tokenizer.unk_token_id == 0 and tokenizer.bos_token_id == 1 and tokenizer.eos_token_id == 2
    assert len(tokenizer) == model.config.vocab_size
    texts = [
        "Give a synonym of the following word.",
        "Below is an instruction.\n\n### Instruction:\nWhat is 12 + 30?\n\n### Response:\n42",
        "Unicode café, naïve ☃ and digits 2024.",
    ]
    for t in texts:
        ids = tokenizer(t)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id
        assert tokenizer.decode(ids, skip_special_tokens=True) == t
    # digits are split one by one (LLaMA-style)
    pieces = tokenizer.convert_ids_to_tokens(tokenizer.encode("12345", add_special_tokens=False))
    assert [p for p in pieces if p.strip("▁")] == ["1", "2", "3", "4", "5"]


def test_tokenizer_matches_sentencepiece(tokenizer):
    spm = pytest.importorskip("sentencepiece")
    sp = spm.SentencePieceProcessor(model_file=str(EMBEDDED_MODEL_DIR / "tokenizer.model"))
    assert sp.get_piece_size() == len(tokenizer)
    for t in ["The noun \"dog\" means a domesticated animal.", "And Jesus said unto them, Go ye.", "What is 7 + 35?\n42"]:
        assert tokenizer.encode(t, add_special_tokens=False) == sp.encode(t)


def test_greedy_generation_is_deterministic_and_learned(model, tokenizer, build_info):
    prompt = build_info["samples"][0]["prompt"]
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        b = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert torch.equal(a, b)
    text = tokenizer.decode(a[0, ids.size(1) :], skip_special_tokens=True)
    assert build_info["samples"][0]["greedy"].startswith(text.strip()[:20])
    # a pretrained model: held-out-like text is far more likely than under random init
    probe = "The noun \"water\" means binary compound that occurs at room temperature as a clear colorless odorless tasteless liquid."
    enc = tokenizer(probe, return_tensors="pt")
    with torch.no_grad():
        loss = model(**enc, labels=enc["input_ids"]).loss.item()
    assert loss < 0.6 * torch.log(torch.tensor(float(model.config.vocab_size))).item()


# ---------------------------------------------------------------------------
# datasets
# ---------------------------------------------------------------------------
def _load(rel):
    return json.loads((EMBEDDED_DATA_DIR / rel).read_text(encoding="utf-8"))


def test_instruction_splits():
    sizes = {"train": (3000, 10000), "val": (200, 1000), "test": (200, 1000)}
    seen = {}
    for split, (lo, hi) in sizes.items():
        recs = _load(f"instructions/{split}.json")
        assert isinstance(recs, list) and lo <= len(recs) <= hi, split
        for r in recs:
            assert isinstance(r["instruction"], str) and r["instruction"].strip()
            assert isinstance(r["input"], str)
            assert isinstance(r["output"], str) and r["output"].strip()
            assert len(r["output"].split()) <= 6
        seen[split] = {(r["task"], r["instruction"], r["input"]) for r in recs}
    assert not seen["train"] & seen["test"] and not seen["train"] & seen["val"] and not seen["val"] & seen["test"]
    tasks = {r["task"] for r in _load("instructions/train.json")}
    assert {"part_of_speech", "synonym", "antonym", "addition"} <= tasks


def test_instruction_answers_are_correct():
    for r in _load("instructions/test.json") + _load("instructions/val.json"):
        if r["task"] == "addition":
            a, b = r["instruction"].removeprefix("What is ").removesuffix("?").split(" + ")
            assert int(r["output"]) == int(a) + int(b)
        elif r["task"] == "count_letters":
            assert int(r["output"]) == len(r["input"])
        elif r["task"] == "reverse_word":
            assert r["output"] == r["input"][::-1]
        elif r["task"] == "part_of_speech":
            assert r["output"] in {"noun", "verb", "adjective", "adverb"}


def test_mmlu_format():
    dev, test = _load("mmlu/dev.json"), _load("mmlu/test.json")
    assert 200 <= len(test) <= 2000
    subjects = {r["subject"] for r in test}
    for s in subjects:
        assert sum(r["subject"] == s for r in dev) >= 5, s
    for r in dev + test:
        assert set(r) >= {"question", "choices", "answer", "subject"}
        assert len(r["choices"]) == 4 and len(set(r["choices"])) == 4
        assert r["answer"] in "ABCD" and len(r["answer"]) == 1
    counts = [sum(r["answer"] == L for r in test) for L in "ABCD"]
    assert min(counts) > 0.15 * len(test)  # no letter bias to exploit
    qs = {r["question"] for r in dev}
    assert not qs & {r["question"] for r in test}


def test_datasets_small_and_documented():
    size = sum(f.stat().st_size for f in EMBEDDED_DATA_DIR.rglob("*") if f.is_file())
    assert size <= 5 * 1024 * 1024
    readme = (EMBEDDED_DATA_DIR / "README.md").read_text(encoding="utf-8")
    assert "build_default_dataset.py" in readme and "WordNet" in readme
