"""bench/smollm2_grid.sh: each stage hands bench/accuracy.py options it parses, with the stated runs.

A ``python`` shim on PATH records the commands instead of running them (no model, no training).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from bench import accuracy_lib as accuracy

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def stage_commands(tmp_path: Path, stage: str, **env: str) -> list[list[str]]:
    shim = tmp_path / "bin"
    shim.mkdir(exist_ok=True)
    log = tmp_path / f"{stage}.log"
    (shim / "python").write_text('#!/bin/sh\nprintf "%s\\n" "$*" >> "$SHIM_LOG"\n'
                                 'case "$1" in scripts/fetch_smollm2.py) echo /models/SmolLM2.gguf ;; esac\n')
    (shim / "python").chmod(0o755)
    environment = {k: v for k, v in os.environ.items() if k not in ("SEEDS", "METHODS", "ALPHA")}  # defaults unless env sets them
    environment.update(env, SHIM_LOG=str(log), PATH=f"{shim}{os.pathsep}{os.environ['PATH']}")
    subprocess.run(["bash", str(ROOT / "bench" / "smollm2_grid.sh"), stage], check=True, env=environment, cwd=tmp_path)
    return [shlex.split(line) for line in log.read_text().splitlines()]


def parsed(command: list[str]):
    """bench/accuracy.py's options of one recorded command, the model left out (not on this machine)."""
    assert command[0] == "bench/accuracy.py"
    argv = command[1:]
    i = argv.index("--model")
    assert argv[i + 1] == "/models/SmolLM2.gguf"
    return accuracy.parse_args(argv[:i] + argv[i + 2:])


@pytest.mark.parametrize("stage, seeds, bits, groups, tag", [
    ("step1", [0, 1, 2], [3, 2], [32], "smollm2"),
    ("step2", [0, 1, 2], [4], [32, 64], "smollm2"),
    ("step3", [0, 1, 2], [4, 3, 2], [32], "smollm2"),  # --bits at its default: QAT rows take --qat-bits
    ("step4", [0, 1, 2], [3, 2], [32], "smollm2_r32"),
    ("step5", [0, 1, 2], [3, 2], [32], "smollm2_r9"),
])
def test_every_stage_runs_the_stated_grid(tmp_path, stage, seeds, bits, groups, tag):
    fetch, command = stage_commands(tmp_path, stage)
    assert fetch == ["scripts/fetch_smollm2.py", "--quiet"]
    args = parsed(command)
    assert (args.seeds, args.bits, args.group_sizes, args.tag) == (seeds, bits, groups, tag)
    assert args.method_lr == {"qlora": 0.001, "qblora": 0.001, "qalora": 0.003, "qablora": 0.003}  # smollm2_lrs.txt
    assert (args.steps, args.batch_size, args.arc_limit, args.mmlu_k_shot, args.mmlu_limit_per_subject) == (200, 4, 1000, 5, 10)
    assert args.rank == {"step4": 32, "step5": 9}.get(stage, 8)
    assert args.reference == (stage in ("step1", "step2"))
    if stage == "step3":
        assert args.qat_only and args.qat_bits == [3, 2] and args.methods == ["qlora", "qblora"]


def test_seeds_narrows_steps_2_to_4_but_not_the_headline(tmp_path):
    for stage in ("step2", "step3", "step4", "step5"):
        assert parsed(stage_commands(tmp_path, stage, SEEDS="0")[1]).seeds == [0]
    assert parsed(stage_commands(tmp_path, "step1", SEEDS="0")[1]).seeds == [0, 1, 2]


def test_methods_narrows_steps_2_4_and_5(tmp_path):
    for stage in ("step2", "step4", "step5"):
        assert parsed(stage_commands(tmp_path, stage)[1]).methods == ["qlora", "qblora", "qalora", "qablora"]
        assert parsed(stage_commands(tmp_path, stage, METHODS="qalora qablora")[-1]).methods == ["qalora", "qablora"]
    assert parsed(stage_commands(tmp_path, "step3", METHODS="qalora")[-1]).methods == ["qlora", "qblora"]  # QAT: its own


def test_alpha_sets_the_scaling_of_steps_4_and_5_in_their_own_files(tmp_path):
    for stage, rank, alpha in (("step4", 32, "64"), ("step5", 9, "18")):
        default = parsed(stage_commands(tmp_path, stage)[-1])
        assert (default.alpha, default.tag) == (None, f"smollm2_r{rank}")  # the strategies' 16
        fair = parsed(stage_commands(tmp_path, stage, ALPHA=alpha)[-1])
        assert (fair.alpha, fair.tag, fair.rank) == (float(alpha), f"smollm2_r{rank}_a{alpha}", rank)
    assert parsed(stage_commands(tmp_path, "step2", ALPHA="64")[-1]).alpha is None  # rank 8 keeps its file's alpha


def test_the_int2_sweep_runs_the_qa_pair_at_four_lrs_on_the_validation_split(tmp_path):
    commands = stage_commands(tmp_path, "sweep_int2")
    runs = [parsed(c) for c in commands[1:-1]]
    assert [(a.qa_lr, a.tag) for a in runs] == [(1e-3, "smollm2_val_int2_qa1e-3"), (3e-3, "smollm2_val_int2_qa3e-3"),
                                              (1e-2, "smollm2_val_int2_qa1e-2"), (3e-2, "smollm2_val_int2_qa3e-2")]
    for a in runs:
        assert (a.eval_split, a.bits, a.group_sizes, a.methods, a.seeds) == ("val", [2], [32], ["qalora", "qablora"], [0])
        assert a.bench_trained == "none" and a.arc is None  # loss on the validation split only
    assert commands[-1][:2] == ["bench/accuracy.py", "--lr-report"]
    # the script runs in the repository: the glob takes the QA pair's sweep files there, never the QAT sweep's
    assert not any("_qat_" in path for path in commands[-1][2:])


def test_the_int2_stage_reruns_step_1s_int2_qa_pair_at_int2s_own_lrs(tmp_path):
    lrs = ROOT / "bench" / "results" / "smollm2_int2_lrs.txt"
    if not lrs.is_file():
        pytest.skip("bench/results/smollm2_int2_lrs.txt not written yet (`bash bench/smollm2_grid.sh int2_lrs`)")
    _, command = stage_commands(tmp_path, "int2", SEEDS="0")
    args = parsed(command)
    assert (args.tag, args.seeds, args.bits, args.group_sizes, args.methods) == (
        "smollm2_int2_lr", [0], [2], [32], ["qalora", "qablora"])
    chosen = lrs.read_text().split()
    assert chosen[0] == "--method-lr" and args.method_lr == {
        item.split("=")[0]: float(item.split("=")[1]) for item in chosen[1:]}
    assert (args.rank, args.steps, args.arc_limit, args.mmlu_limit_per_subject) == (8, 200, 1000, 10)  # step 1's
    assert args.bench_trained == "none" and not args.reference


def test_the_qat_int2_sweep_runs_qlora_with_qat_for_int2_at_four_lrs_on_val(tmp_path):
    commands = stage_commands(tmp_path, "sweep_qat_int2")
    runs = [parsed(c) for c in commands[1:-1]]
    assert [(a.lr, a.tag) for a in runs] == [(1e-3, "smollm2_val_int2_qat_lr1e-3"), (3e-3, "smollm2_val_int2_qat_lr3e-3"),
                                           (1e-2, "smollm2_val_int2_qat_lr1e-2"), (3e-4, "smollm2_val_int2_qat_lr3e-4")]
    for a in runs:
        assert (a.eval_split, a.methods, a.qat_only, a.qat_bits, a.group_sizes, a.seeds) == (
            "val", ["qlora"], True, [2], [32], [0])
        assert accuracy.planned_runs(a) == [("qlora", 0, 2, 32, True)]  # one QAT run for INT2 g32, no NF4 row
    assert commands[-1][:2] == ["bench/accuracy.py", "--lr-report"] and commands[-1][-2:] == ["--lr-criterion", "deployed"]
