"""bench/accuracy.py's ResultsStore: two workers on one results file split the runs and lose no row."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bench import accuracy_lib as accuracy

QA_RUN = ("qalora", 0, 2, 32, False)  # a QA-* run: done exactly when its row is stored
OTHER_RUN = ("qablora", 0, 2, 32, False)


def _args():
    return accuracy.parse_args(["--bits", "2", "--group-sizes", "32", "--seeds", "0"])


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _row(name: str) -> dict:
    return {"method": name, "trained": {"loss": 1.0}, "low_bit": {"loss": 2.0}}


def test_a_run_claimed_by_a_live_process_is_skipped_and_a_dead_ones_taken_over(tmp_path):
    store = accuracy.ResultsStore(tmp_path / "r.json", {"tag": "t"})
    key = accuracy.run_key(*QA_RUN)
    store.claims_path.write_text(json.dumps({key: os.getppid()}))  # alive, and not this process
    assert store.claim(_args(), QA_RUN) is None
    assert store.claim(_args(), OTHER_RUN) == {}  # another run is free
    store.claims_path.write_text(json.dumps({key: _dead_pid()}))  # e.g. a session that was killed
    assert store.claim(_args(), QA_RUN) == {}
    assert json.loads(store.claims_path.read_text()) == {key: os.getpid()}


def test_a_stored_run_is_not_claimed_again(tmp_path):
    store = accuracy.ResultsStore(tmp_path / "r.json", {"tag": "t"})
    assert store.claim(_args(), QA_RUN) == {}
    assert [p.name for p in tmp_path.glob("*.json")] == []  # a claim is not a results file to a glob
    store.store(QA_RUN, {accuracy.run_key(*QA_RUN): _row("qalora")})
    assert not store.claims_path.exists()  # the claim is released; no claims file left behind
    assert store.claim(_args(), QA_RUN) is None


def test_each_store_merges_into_the_file_as_it_is_on_disk(tmp_path):
    """Two workers that read the file before either finished: both rows survive."""
    path = tmp_path / "r.json"
    first, second = accuracy.ResultsStore(path, {"tag": "t"}), accuracy.ResultsStore(path, {"tag": "t"})
    assert first.claim(_args(), QA_RUN) == {} and second.claim(_args(), OTHER_RUN) == {}
    first.store(QA_RUN, {accuracy.run_key(*QA_RUN): _row("qalora")})
    merged = second.store(OTHER_RUN, {accuracy.run_key(*OTHER_RUN): _row("qablora")})
    stored = json.loads(path.read_text())
    assert set(stored["runs"]) == set(merged) == {accuracy.run_key(*QA_RUN), accuracy.run_key(*OTHER_RUN)}
    assert stored["settings"] == {"tag": "t"}
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []  # atomic writes leave nothing


@pytest.mark.slow  # two processes each importing torch + Lightning: ~1 min on 2 cores
def test_two_worker_processes_split_the_planned_runs(tmp_path):
    """The same command started twice: every run is made once, by one of the two, and both are stored."""
    out = tmp_path / "tiny.json"
    command = [sys.executable, "bench/accuracy.py", "--steps", "1", "--warmup", "0", "--test-batches", "1",
               "--eval-batch-size", "8", "--seeds", "0", "1", "--bits", "2", "--group-sizes", "32",
               "--methods", "qalora", "--tag", "tiny", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    root = accuracy.ROOT
    workers = [subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True) for _ in range(2)]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    made = [line.split("]")[1].split(":")[0].strip() for text in outputs for line in text.splitlines()
            if line.startswith("[") and "trained loss" in line]
    assert sorted(made) == ["qalora|int2_g32|seed0", "qalora|int2_g32|seed1"], outputs
    assert set(json.loads(out.read_text())["runs"]) == set(made)


def test_a_gguf_model_is_named_by_its_content_so_a_fresh_fetch_resumes_the_same_file(tmp_path, monkeypatch):
    """The settings that gate resuming name a .gguf by content, not by its conversion's cache
    directory (keyed by path and mtime): a re-fetched file on a new machine is the same model."""
    import qblora_pl.sources

    monkeypatch.setattr(qblora_pl.sources, "pretrained_name_or_path",
                        lambda path: f"/cache/gguf/model-{os.stat(path).st_mtime_ns}")
    first, again, other = tmp_path / "a" / "m.gguf", tmp_path / "b" / "m.gguf", tmp_path / "c" / "m.gguf"
    for path, content in ((first, b"weights"), (again, b"weights"), (other, b"other weights")):
        path.parent.mkdir()
        path.write_bytes(content)
    os.utime(again, ns=(1, 1))

    def parsed(path):
        return accuracy.parse_args(["--model", str(path), "--bits", "2", "--seeds", "0"])

    assert parsed(first).model_dir != parsed(again).model_dir  # loading uses each conversion
    settings = [accuracy.run_settings(parsed(p))["model"] for p in (first, again, other)]
    assert settings[0] == settings[1] and settings[0].startswith("m.gguf sha256:")
    assert settings[2] != settings[0]
    assert "model_dir" not in accuracy.run_settings(parsed(first))


def _hits_row(method, seed, base, hits, part="low_bit"):
    scores = {"arc_acc": hits.count("1") / len(hits), "hits": {"arc_acc": hits}}
    return {"method": method, "seed": seed, "base": base, "trained": scores if part == "trained" else None,
            "low_bit": scores if part == "low_bit" else None}


def test_paired_difference_matches_hand_computed_numbers():
    """Per question: A's seed-mean minus B's; mean and stdev/sqrt(n) of those differences."""
    results = {
        "qablora|int3_g32|seed0": _hits_row("qablora", 0, "int3_g32", "1100"),
        "qablora|int3_g32|seed1": _hits_row("qablora", 1, "int3_g32", "1010"),
        "qalora|int3_g32|seed0": _hits_row("qalora", 0, "int3_g32", "1000"),
    }
    # A per question: 1, .5, .5, 0; B: 1, 0, 0, 0 -> differences 0, .5, .5, 0
    mean, se, n, seeds_a, seeds_b = accuracy.paired_difference(results, "qablora|int3_g32", "qalora|int3_g32", "arc_acc")
    assert (mean, n, seeds_a, seeds_b) == (0.25, 4, 2, 1)
    assert se == pytest.approx((1 / 3) ** 0.5 / 2 / 2)  # stdev of (0, .5, .5, 0) = sqrt(1/12); / sqrt(4)
    table = accuracy.claims_markdown(results)
    assert "| QA-BLoRA vs QA-LoRA | INT3 g32 | arc_acc | +0.2500 | 0.1443 | +1.7 | 4 | 2 / 1 |" in table
    assert accuracy.paired_difference(results, "qablora|int3_g32", "qlora+ptq|int3_g32", "arc_acc") is None
    trained = {"qblora|nf4|seed0": _hits_row("qblora", 0, "nf4", "11", "trained"),
               "qlora|nf4|seed0": _hits_row("qlora", 0, "nf4", "01", "trained")}
    assert accuracy.paired_difference(trained, "qblora|nf4", "qlora|nf4", "arc_acc")[:1] == (0.5,)
