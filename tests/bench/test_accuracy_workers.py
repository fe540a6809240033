"""bench/accuracy.py's ResultsStore: two workers on one results file split the runs and lose no row."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bench import accuracy

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
