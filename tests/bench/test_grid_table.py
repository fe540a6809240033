"""bench/smollm2_grid_table.py: the grid block of docs/results/README.md, on a partly filled grid."""

from __future__ import annotations

from bench import smollm2_grid_table as grid
from bench.accuracy_lib.stats import mean_pm_std


def _row(method, seed, base, loss, arc, hits, part="low_bit"):
    scores = {"loss": loss, "arc_acc": arc, "hits": {"arc_acc": hits}}
    params = {"reference": 0, "qalora": 1_281_600}.get(method, 1_762_560)
    return {"method": method, "seed": seed, "base": base, "trainable_params": params,
            "trained": scores if part == "trained" else None, "low_bit": scores if part == "low_bit" else None}


RESULTS = {
    "reference|dense": _row("reference", None, "dense", 2.05, 0.5, "1010", "trained"),
    "qablora|int3_g32|seed0": _row("qablora", 0, "int3_g32", 2.0, 0.5, "1100"),
    "qablora|int3_g32|seed1": _row("qablora", 1, "int3_g32", 2.2, 0.75, "1110"),
    "qalora|int3_g32|seed0": _row("qalora", 0, "int3_g32", 2.3, 0.25, "1000"),
}


def test_the_table_shows_mean_std_over_the_seeds_stored_so_far():
    table = grid.results_table(RESULTS)
    assert "| Unmodified model (no training) | dense (Q4_1 weights) | — | 2.0500 | 0.500 | — | — | — |" in table
    assert "| QA-BLoRA | INT3 g32 | 1,762,560 | 2.1000 ± 0.1414 | 0.625 ± 0.177 | — | — | 2 |" in table
    assert "| QA-LoRA | INT3 g32 | 1,281,600 | 2.3000 | 0.250 | — | — | 1 |" in table  # one seed: no "± 0"


def test_the_block_counts_what_is_left_and_pairs_the_comparisons():
    text = grid.block(RESULTS)
    assert "4 of 21 step-1 runs stored; to go: reference|int3_g32, reference|int2_g32, qlora|nf4|seed0" in text
    # QA-BLoRA per question 1, 1, .5, 0; QA-LoRA 1, 0, 0, 0: differences 0, 1, .5, 0
    assert "| QA-BLoRA vs QA-LoRA | INT3 g32 | arc_acc | +0.3750 |" in text
    assert "CPU time (wall-clock of the runs where each ran): 4 runs" in text


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
        assert f"(../../bench/results/accuracy_smollm2_{metric}.png)" in text  # relative to docs/results/README.md
        assert (grid.RESULTS_DOC.parent / grid.plot_link(metric)).resolve() == grid.plot_path(metric).resolve()
    results_path = tmp_path / "accuracy_smollm2.json"
    written = grid.write_plots(RESULTS, results_path)
    assert [p.name for p in written] == [f"accuracy_smollm2_{metric}.png" for metric, _ in grid.PLOTS]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in written)


def test_each_claim_reading_follows_the_stated_rule():
    from bench.accuracy_lib.claims import verdict
    assert verdict(1, None) == "**reproduced**"  # ARC decides; a one-seed loss is not judged
    assert verdict(1, 0) == "**reproduced**"
    assert verdict(-1, None) == "**not reproduced**: A is worse"
    assert verdict(1, -1).startswith("mixed") and verdict(-1, 1).startswith("mixed")
    assert verdict(0, None) == "within noise"
    assert verdict(0, 1) == "within noise on ARC-Easy; the test loss favours A"
    assert verdict(None, None).startswith("not judged yet")  # no ARC score, one seed: nothing to read
    assert verdict(None, 1) == "ARC-Easy not scored; the test loss favours A"
    assert verdict(None, 0) == "ARC-Easy not scored; the test loss is within noise"


def _seeds(method, fmt, runs):
    return {f"{method}|{fmt}|seed{i}": _row(method, i, fmt, loss, hits.count("1") / len(hits), hits)
            for i, (loss, hits) in enumerate(runs)}


def test_the_claims_are_read_from_hand_computed_differences():
    from bench.accuracy_lib.claims import claims_reading
    # INT3: per question A = 1 1 1 1 .5 0 0 0, B = 0 0 0 0 .5 0 0 0 -> differences 1 1 1 1 0 0 0 0:
    # mean .5, SE sqrt(2/7)/sqrt(8) = .18898, z = 2.65. Loss: A 2.1 ± .1414, B 2.6 ± .1414 over 2 seeds
    # -> Δ -0.5, SE sqrt(.02/2 + .02/2) = .14142, z = -3.54 (A better).
    results = {**_seeds("qablora", "int3_g32", [(2.0, "11110000"), (2.2, "11111000")]),
               **_seeds("qalora", "int3_g32", [(2.5, "00000000"), (2.7, "00001000")]),
               # INT2: every difference 1 -> the change per question 0 0 0 0 1 1 1 1: +.5, SE .189
               **_seeds("qablora", "int2_g32", [(3.0, "11111111"), (3.2, "11111111")]),
               **_seeds("qalora", "int2_g32", [(1.5, "00000000"), (1.7, "00000000")])}  # loss: A worse
    text = claims_reading(results)
    assert ("| QA-BLoRA's exact low-bit model beats QA-LoRA | INT3 g32 | +0.500 (+2.65) | -0.5000 (-3.54) | 2 / 2 "
            "| **reproduced** |") in text
    assert "| INT2 g32 | +1.000 (—) " not in text  # SE 0 on identical differences: no ratio shown
    assert ("| QA-BLoRA's exact low-bit model beats QA-LoRA | INT2 g32 | +1.000 | +1.5000 (+10.61) | 2 / 2 | mixed: "
            in text)
    assert ("QA-BLoRA's exact low-bit model beats QA-LoRA: INT3 g32 → INT2 g32: arc_acc Δ +0.500 → +1.000, "
            "change +0.500 (paired SE 0.189; seeds A / B 2 / 2 → 2 / 2): the gap widens.") in text
    one_seed = {**_seeds("qablora", "int3_g32", [(2.0, "11110000")]),
                **_seeds("qalora", "int3_g32", [(2.5, "11110000"), (2.7, "11110000")])}
    assert "| +0.000 | -0.6000 (one seed: no spread) | 1 / 2 | within noise |" in claims_reading(one_seed)
    assert claims_reading({}) == "(no claim can be read yet)"


def test_the_gap_is_followed_down_each_group_size_even_with_other_groups_stored():
    from bench.accuracy_lib.claims import widening
    # per question A - B: INT4 g32 0 0 0 0, INT3 g32 1 1 0 0, INT2 g32 1 1 1 1; INT4 g64 sits between INT4 g32 and
    # INT3 g32 in the width order but belongs to another group, so g32 is followed INT4 -> INT3 -> INT2.
    results = {**_seeds("qablora", "int4_g32", [(2.0, "0000")]), **_seeds("qalora", "int4_g32", [(2.0, "0000")]),
               **_seeds("qablora", "int4_g64", [(2.0, "1111")]), **_seeds("qalora", "int4_g64", [(2.0, "0000")]),
               **_seeds("qablora", "int3_g32", [(2.0, "1100")]), **_seeds("qalora", "int3_g32", [(2.0, "0000")]),
               **_seeds("qablora", "int2_g32", [(2.0, "1111")]), **_seeds("qalora", "int2_g32", [(2.0, "0000")])}
    lines = widening(results, "qablora", "qalora")
    # INT4 -> INT3 changes 1 1 0 0: +.5, SE sqrt(1/3)/2 = .289; INT3 -> INT2 changes 0 0 1 1: the same
    assert lines == ["INT4 g32 → INT3 g32: arc_acc Δ +0.000 → +0.500, change +0.500 (paired SE 0.289; seeds A / B "
                     "1 / 1 → 1 / 1): the gap does not change beyond noise",
                     "INT3 g32 → INT2 g32: arc_acc Δ +0.500 → +1.000, change +0.500 (paired SE 0.289; seeds A / B "
                     "1 / 1 → 1 / 1): "
                     "the gap does not change beyond noise"]


def test_later_steps_count_what_each_seed_has_stored():
    assert grid.later_steps({}) == ("step 2 (INT4 g32 / g64): not started; "
                                    "step 3 (QAT QLoRA / Q-BLoRA, INT3 / INT2 g32): not started")
    results = {**RESULTS, "qablora|int4_g64|seed2": _row("qablora", 2, "int4_g64", 2.0, 0.5, "1100"),
               "reference|int4_g32": _row("reference", None, "int4_g32", 2.1, 0.5, "1100"),
               "qlora+qat|int3_g32|seed0": _row("qlora+qat", 0, "int3_g32", 2.4, 0.5, "1100")}
    text = grid.later_steps(results)
    # step 2 per seed: qlora, qblora (one run each for both widths) + qalora / qablora at INT4 g32 and g64
    assert text.startswith("step 2 (INT4 g32 / g64): references 2 of 3, 0 of 3 seeds so far (seed 0: 0 of 6 runs, "
                           "seed 1: 0 of 6 runs, seed 2: 1 of 6 runs); ")
    assert text.endswith("step 3 (QAT QLoRA / Q-BLoRA, INT3 / INT2 g32): 0 of 3 seeds so far (seed 0: 1 of 4 runs, "
                         "seed 1: 0 of 4 runs, seed 2: 0 of 4 runs)")
    assert "step 2 (INT4 g32 / g64): references 2 of 3" in grid.block(results)


def test_a_rank_step_sets_qablora_vs_qalora_beside_rank_8_on_its_seeds():
    ranked = {  # rank 9, seed 0 only: QA-BLoRA per question 1, 1, 1, 0; QA-LoRA 1, 0, 0, 0
        "qablora|int3_g32|seed0": _row("qablora", 0, "int3_g32", 2.0, 0.75, "1110"),
        "qalora|int3_g32|seed0": _row("qalora", 0, "int3_g32", 2.5, 0.25, "1000"),
    }
    step, rank, alpha, why = next(s for s in grid.RANK_STEPS if s[1] == 9 and s[2] is None)
    text = grid.rank_block(step, rank, alpha, why, ranked, RESULTS)
    assert "**Step 5: budget rank 9**" in text and "bench/results/accuracy_smollm2_r9.json" in text
    assert "Stored: 0 of 3 seeds so far (seed 0: 2 of 6 runs, seed 1: 0 of 6 runs, seed 2: 0 of 6 runs)." in text
    # rank 8 on seed 0 alone: QA-BLoRA 1100 vs QA-LoRA 1000 -> +0.25; rank 9: +0.5; losses 2.0 - 2.3, 2.0 - 2.5
    assert "| INT3 g32 | 0 | +0.250 (+1.00) | +0.500 (+1.73) | -0.3000 | -0.5000 |" in text
    # a seed only QA-LoRA has stored so far does not enter the side-by-side (it would pair seed 0 with 0-1)
    later = {**ranked, "qalora|int3_g32|seed1": _row("qalora", 1, "int3_g32", 2.7, 0.0, "0000"),
             "qalora|int2_g32|seed1": _row("qalora", 1, "int2_g32", 4.0, 0.0, "0000")}
    shown = grid.rank_block(step, rank, alpha, why, later, RESULTS)
    assert "| INT3 g32 | 0 | +0.250 (+1.00) | +0.500 (+1.73) | -0.3000 | -0.5000 |" in shown
    side_by_side = shown.split("restricted to them):")[1].split("claims, read by")[0]
    assert "| INT3 g32 |" in side_by_side and "| INT2 g32 |" not in side_by_side  # no QA-BLoRA at INT2: no row
    assert "| QA-BLoRA's exact low-bit model beats QA-LoRA | INT3 g32 |" in text
    assert grid.rank_block(step, rank, alpha, why, {}, RESULTS).endswith("Not started.")
    assert grid.rank_file(32).name == "accuracy_smollm2_r32.json"


def test_a_fair_scaling_rank_step_has_its_own_file_title_and_command():
    assert grid.rank_file(32, 64.0).name == "accuracy_smollm2_r32_a64.json"
    step, rank, alpha, why = next(s for s in grid.RANK_STEPS if s[1] == 9 and s[2] is not None)
    text = grid.rank_block(step, rank, alpha, why, {}, RESULTS)
    assert text.startswith("**Step 5: budget rank 9, alpha 18 (s = 2)** (`ALPHA=18 METHODS=")
    assert "bench/results/accuracy_smollm2_r9_a18.json" in text and text.endswith("Not started.")


def test_step_3s_qat_rows_are_compared_with_qablora_and_with_each_other():
    from bench.accuracy_lib.claims import claims_markdown, claims_reading
    # INT2, one seed each: QA-BLoRA 1100, QLoRA + QAT 1000, Q-BLoRA + QAT 0000
    results = {**_seeds("qablora", "int2_g32", [(4.3, "1100")]), **_seeds("qlora+qat", "int2_g32", [(3.9, "1000")]),
               **_seeds("qblora+qat", "int2_g32", [(4.0, "0000")])}
    table = claims_markdown(results)
    assert "| QA-BLoRA vs QLoRA + QAT + RTN | INT2 g32 | arc_acc | +0.2500 |" in table
    assert "| Q-BLoRA + QAT + RTN vs QLoRA + QAT + RTN | INT2 g32 | arc_acc | -0.2500 |" in table
    reading = claims_reading(results)
    assert ("| QA-BLoRA's exact low-bit model beats QLoRA + QAT + RTN | INT2 g32 | +0.250 (+1.00) | "
            "+0.4000 (one seed: no spread) | 1 / 1 | within noise |") in reading


def test_int2_at_its_own_lr_sets_the_pair_beside_step_1_and_reads_the_claims_with_its_baselines(tmp_path):
    import json
    sweep = tmp_path / "accuracy_smollm2_val_int2_qa1e-2.json"
    runs = {f"{m}|int2_g32|seed0": _row(m, 0, "int2_g32", loss, 0.5, "10") for m, loss in (("qalora", 3.6), ("qablora", 3.5))}
    for row in runs.values():
        row["trained"] = row["low_bit"]
    sweep.write_text(json.dumps({"settings": {"lr": 1e-3, "qa_lr": 1e-2, "eval_split": "val"}, "runs": runs}))
    step1 = {**_seeds("qablora", "int2_g32", [(4.3, "1000"), (4.4, "1000")]),
             **_seeds("qalora", "int2_g32", [(4.2, "1100"), (4.2, "1100")]),
             **_seeds("qlora+ptq", "int2_g32", [(11.0, "0000")]),
             **_seeds("qalora", "int3_g32", [(2.1, "1111")]),  # another width: not a baseline of INT2's
             "reference|int2_g32": _row("reference", None, "int2_g32", 12.5, 0.25, "1000"),
             "reference|int3_g32": _row("reference", None, "int3_g32", 3.4, 0.25, "1000")}
    tuned = {**_seeds("qablora", "int2_g32", [(3.5, "1110")]), **_seeds("qalora", "int2_g32", [(3.6, "1100")])}
    text = grid.int2_lr_block(tuned, step1, [sweep], {"qalora": 0.01, "qablora": 0.01})
    assert "the unmodified model's test loss: INT3 g32 3.40, INT2 g32 12.51" not in text  # 12.50: computed
    assert "the unmodified model's test loss: INT3 g32 3.40, INT2 g32 12.50" in text
    assert "for the test runs: --method-lr qalora=0.01 qablora=0.01" in text  # the sweep's own report
    assert ("Test runs stored: 1 of 3 seeds so far (seed 0: 2 of 2 runs, seed 1: 0 of 2 runs, seed 2: 0 of 2 runs); "
            "LR: QA-LoRA 0.01, QA-BLoRA 0.01.") in text
    # seed 0: step 1 QA-BLoRA 1000 vs QA-LoRA 1100 -> -0.25, loss 4.3 - 4.2; INT2's LR 1110 vs 1100 -> +0.25, -0.1
    assert "| INT2 g32 | 0 | -0.250 (-1.00) | +0.250 (+1.00) | +0.1000 | -0.1000 |" in text
    # the claims: tuned QA-BLoRA against step 1's QLoRA + RTN (0000) and tuned QA-LoRA; INT3 rows left out
    assert "| QA-BLoRA's exact low-bit model beats QLoRA + RTN | INT2 g32 | +0.750 (+3.00) |" in text
    assert "| QA-BLoRA's exact low-bit model beats QA-LoRA | INT2 g32 | +0.250 (+1.00) |" in text
    assert "INT3 g32 |" not in text.split("read by the same rule")[-1]
    assert grid.int2_lr_block({}, step1, [sweep]).endswith("Test runs not started.")
    assert grid.int2_lr_block({}, step1, []).endswith("Not started.")


def test_the_int2_sweep_files_are_the_qa_pairs_not_the_qat_sweeps(tmp_path):
    results = tmp_path / "accuracy_smollm2.json"
    for name in ("val_int2_qa1e-2", "val_int2_qa3e-2", "val_int2_qat_lr1e-3", "val_lr1e-3"):
        (tmp_path / f"accuracy_smollm2_{name}.json").write_text("{}")
    assert [p.name for p in grid.int2_sweep_files(results)] == [
        "accuracy_smollm2_val_int2_qa1e-2.json", "accuracy_smollm2_val_int2_qa3e-2.json"]


def test_qlora_qat_s_own_int2_sweep_chooses_by_the_deployed_loss_and_skips_unfinished_files(tmp_path):
    import json
    results = tmp_path / "accuracy_smollm2.json"
    for lr, loss in (("1e-3", 3.9), ("3e-3", 4.1), ("1e-2", None)):  # 1e-2: a run still going, no rows yet
        runs = {} if loss is None else {"qlora+qat|int2_g32|seed0": _row("qlora+qat", 0, "int2_g32", loss, 0.5, "10")}
        (tmp_path / f"accuracy_smollm2_val_int2_qat_lr{lr}.json").write_text(
            json.dumps({"settings": {"lr": float(lr), "qa_lr": 3e-3, "eval_split": "val"}, "runs": runs}))
    (tmp_path / "accuracy_smollm2_val_int2_qa1e-2.json").write_text("{}")  # the QA pair's sweep: not this one's
    files = grid.qat_int2_sweep_files(results)
    assert [p.name.split("_lr")[-1] for p in files] == ["1e-2.json", "1e-3.json", "3e-3.json"]
    text = grid.qat_int2_sweep_block(files)
    assert "qlora+qat      int2_g32       3.9000     4.1000" in text
    assert "for the test runs: --method-lr qlora=0.001" in text
    assert "trained model's" not in text  # --bench-trained none: no section without scores
    assert grid.qat_int2_sweep_block(files[:1]).endswith("Not started.")
    assert grid.qat_int2_sweep_block([]).endswith("Not started.")


def test_a_seed_count_says_how_many_seeds_are_complete():
    from bench.accuracy_lib.cli import parse_args
    args = parse_args(["--seeds", "0", "1", "2"])
    runs = [("m", seed, i) for seed in (0, 1, 2) for i in range(2)]
    assert grid.per_seed(args, runs, runs) == "all 3 seeds (2 runs each)"
    assert grid.per_seed(args, runs, runs[:3]) == ("1 of 3 seeds so far (seed 0: 2 of 2 runs, seed 1: 1 of 2 runs, "
                                                    "seed 2: 0 of 2 runs)")


def test_the_generators_write_the_results_file_and_leave_the_readme_alone():
    from bench import smollm2_sweep_table as sweep
    for module, marker in ((grid, "grid"), (sweep, "sweep")):
        assert module.RESULTS_DOC == grid.ROOT / "docs" / "results" / "README.md"
        text = module.RESULTS_DOC.read_text(encoding="utf-8")
        assert f"<!-- {marker}:start -->\n" in text and f"\n<!-- {marker}:end -->" in text
        assert f"<!-- {marker}:" not in (grid.ROOT / "README.md").read_text(encoding="utf-8")
