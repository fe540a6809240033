"""bench/smollm2_grid_table.py: the README block of the issue-13 grid, on a partly filled grid."""

from __future__ import annotations

from bench import smollm2_grid_table as grid
from bench.accuracy import mean_pm_std


def _row(method, seed, base, loss, arc, hits, part="low_bit"):
    scores = {"loss": loss, "arc_acc": arc, "hits": {"arc_acc": hits}}
    return {"method": method, "seed": seed, "base": base, "trainable_params": 0,
            "trained": scores if part == "trained" else None, "low_bit": scores if part == "low_bit" else None}


RESULTS = {
    "reference|dense": _row("reference", None, "dense", 2.05, 0.5, "1010", "trained"),
    "qablora|int3_g32|seed0": _row("qablora", 0, "int3_g32", 2.0, 0.5, "1100"),
    "qablora|int3_g32|seed1": _row("qablora", 1, "int3_g32", 2.2, 0.75, "1110"),
    "qalora|int3_g32|seed0": _row("qalora", 0, "int3_g32", 2.3, 0.25, "1000"),
}


def test_the_table_shows_mean_std_over_the_seeds_stored_so_far():
    table = grid.results_table(RESULTS)
    assert "| Unmodified model (no training) | dense (Q4_1 weights) | 2.0500 | 0.500 | — | — | — |" in table
    assert "| QA-BLoRA | INT3 g32 | 2.1000 ± 0.1414 | 0.625 ± 0.177 | — | — | 2 |" in table
    assert "| QA-LoRA | INT3 g32 | 2.3000 | 0.250 | — | — | 1 |" in table  # one seed: no "± 0"


def test_the_block_counts_what_is_left_and_pairs_the_comparisons():
    text = grid.block(RESULTS)
    assert "4 of 21 step-1 runs stored; to go: reference|int3_g32, reference|int2_g32, qlora|nf4|seed0" in text
    # QA-BLoRA per question 1, 1, .5, 0; QA-LoRA 1, 0, 0, 0: differences 0, 1, .5, 0
    assert "| QA-BLoRA vs QA-LoRA | INT3 g32 | arc_acc | +0.3750 |" in text


def test_one_seed_shows_no_spread_and_several_show_their_std():
    assert mean_pm_std(1.92711, 0.0, 1) == "1.9271"
    assert mean_pm_std(0.5, 0.0707, 2, digits=3) == "0.500 ± 0.071"
    assert mean_pm_std(0.5, 0.0, 3, digits=3) == "0.500 ± 0.000"  # three seeds that agree: a measured 0


def test_the_mmlu_note_measures_the_unmodified_model_against_chance():
    near = {"reference|dense": {"trained": {"mmlu_acc": 0.268, "mmlu_n": 570, "arc_acc": 0.503}}}
    assert "0.268 on 570 questions (binomial error 0.019) is 1.0 errors above it" in grid.chance_note(near)
    assert "cannot rank the methods" in grid.chance_note(near)
    far = {"reference|dense": {"trained": {"mmlu_acc": 0.40, "mmlu_n": 570, "arc_acc": 0.7}}}
    assert "MMLU can rank the methods too" in grid.chance_note(far)
    assert grid.chance_note(RESULTS) == ""  # no MMLU score stored for the unmodified model: no note


def test_the_block_shows_the_plots_that_main_writes(tmp_path):
    text = grid.block(RESULTS)
    for metric, _ in grid.PLOTS:
        assert f"(bench/results/accuracy_smollm2_{metric}.png)" in text
    results_path = tmp_path / "accuracy_smollm2.json"
    written = grid.write_plots(RESULTS, results_path)
    assert [p.name for p in written] == [f"accuracy_smollm2_{metric}.png" for metric, _ in grid.PLOTS]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in written)
