"""bench/accuracy.py's real-model options on the embedded model: reference rows, benchmark scores, timing, LR report.

One tiny run (2 steps, 1 held-out batch, a handful of ARC-style and MMLU questions from the
embedded sets in qblora_pl/assets/data) is shared by the tests of this module.
"""

from __future__ import annotations

import json
import shutil

import lightning.pytorch as pl
import pytest
import torch

from bench import accuracy_lib as accuracy
from qblora_pl.paths import EMBEDDED_DATA_DIR, EMBEDDED_MODEL_DIR

RESULTS = accuracy.ROOT / "bench" / "results"
TINY = ["--steps", "2", "--warmup", "1", "--test-batches", "1", "--eval-batch-size", "8", "--seeds", "0",
        "--group-sizes", "32", "--arc", str(EMBEDDED_DATA_DIR / "zero_shot" / "test.json"), "--arc-limit", "4",
        "--mmlu-dir", str(EMBEDDED_DATA_DIR / "mmlu"), "--mmlu-k-shot", "1", "--mmlu-limit-per-subject", "1"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Reference rows + QA-BLoRA at INT2 g32 + QLoRA re-quantized to INT2 g32, then INT3 added by a second call."""
    out = tmp_path_factory.mktemp("accuracy") / "tiny.json"
    base = TINY + ["--tag", "tiny", "--out", str(out), "--bench-trained", "nf4"]
    accuracy.main(base + ["--methods", "qlora", "qablora", "--bits", "2", "--reference"])
    first = json.loads(out.read_text())
    kept = sorted(p.name for p in out.with_name("tiny.adapters").iterdir())
    with pytest.MonkeyPatch.context() as patch:  # the stored QLoRA run gains INT3 from its kept adapter
        patch.setattr(pl.Trainer, "fit", lambda *a, **k: pytest.fail("the kept adapter must not be retrained"))
        accuracy.main(base + ["--methods", "qlora", "--bits", "3", "2"])
    return out, first, json.loads(out.read_text()), kept


def test_reference_rows_score_the_unmodified_model(tiny_run):
    from qblora_pl.quantization import GroupwiseInt, NoQuantization

    _, stored, _, _ = tiny_run
    runs = stored["runs"]
    dense, int2 = runs["reference|dense"], runs["reference|int2_g32"]
    assert set(runs) == {"reference|dense", "reference|int2_g32", "qlora|nf4|seed0", "qlora+ptq|int2_g32|seed0",
                         "qablora|int2_g32|seed0"}
    assert dense["low_bit"] is None and int2["trained"] is None and dense["trainable_params"] == 0
    for scores in (dense["trained"], int2["low_bit"]):
        assert {"loss", "arc_acc", "arc_acc_norm", "mmlu_acc"} <= set(scores)
        assert scores["arc_n"] == 4 and scores["mmlu_n"] >= 2
    # The rows are the unmodified model's scores on the same held-out batch as the trained runs.
    args = accuracy.parse_args(TINY + ["--tag", "tiny"])
    data = accuracy.make_data(args, seed=0)
    batches = accuracy.eval_batches(data, torch.device("cpu"), 1)
    assert len(batches) == 1 and batches[0]["input_ids"].size(0) == dense["trained"]["records"] == 8
    for backend, expected in ((NoQuantization("float32"), dense["trained"]), (GroupwiseInt(2, 32), int2["low_bit"])):
        assert accuracy.score(backend.load(str(EMBEDDED_MODEL_DIR)), batches)["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    assert int2["low_bit"]["loss"] != pytest.approx(dense["trained"]["loss"], rel=1e-3)  # RTN to INT2 hurts


def test_benchmarks_are_scored_next_to_the_loss(tiny_run):
    _, stored, _, _ = tiny_run
    runs = stored["runs"]
    qlora, ptq, qablora = runs["qlora|nf4|seed0"], runs["qlora+ptq|int2_g32|seed0"], runs["qablora|int2_g32|seed0"]
    for scores in (qlora["trained"], ptq["low_bit"], qablora["low_bit"]):
        assert 0.0 <= scores["arc_acc"] <= 1.0 and 0.0 <= scores["arc_acc_norm"] <= 1.0 and 0.0 <= scores["mmlu_acc"] <= 1.0
    assert "arc_acc" not in qlora["merged"]  # the dense merge is the trained model up to rounding: loss only
    assert "arc_acc" not in qablora["trained"]  # --bench-trained nf4: QA-*'s trained model is its deployed model
    for row in runs.values():
        assert row["eval_seconds"] > 0 and row["cpu_seconds"] > 0 and row["run"]  # CPU / wall depends on the load
        assert row["machine"] == accuracy.machine() and row["machine"]["cores"] >= 1 and row["machine"]["torch"]
    assert ptq["run"] == "qlora|nf4|seed0" and ptq["eval_seconds"] == qlora["eval_seconds"]
    settings = stored["settings"]
    assert settings["arc_limit"] == 4 and settings["mmlu_k_shot"] == 1 and settings["mmlu_limit_per_subject"] == 1
    assert "prompt_template" not in settings and "bench_trained" not in settings and "reference" not in settings


def test_a_later_call_adds_requantizations_to_the_stored_run(tiny_run):
    _, first, final, kept = tiny_run
    runs = final["runs"]
    assert "qlora+ptq|int3_g32|seed0" in runs
    added = runs["qlora+ptq|int3_g32|seed0"]
    # Retrained with the same seed: the same model, so the stored trained scores (with benchmarks) are reused.
    # The stored run's kept adapter (QLoRA / Q-BLoRA only: QA-* are trained per format) is loaded, not
    # retrained: the same model, so the stored trained scores (with benchmarks) are reused.
    assert kept == ["qlora_nf4_seed0.pt"]
    stored = first["runs"]["qlora|nf4|seed0"]
    assert "retrained" not in added and added["trained"] == stored["trained"]
    assert added["adapter_reused"] is True and added["train_seconds"] == stored["train_seconds"]
    assert added["run"] == "qlora|nf4|seed0 again for int3_g32"
    hour_each = {key: {**row, "train_seconds": 0.0 if row["method"] == "reference" else 3600.0} for key, row in runs.items()}
    assert "training 2.00 h" in accuracy.compute_time(hour_each)  # QLoRA and QA-BLoRA; the reused training not twice
    for key, row in first["runs"].items():
        assert runs[key] == row  # nothing already stored was redone


def test_a_later_call_scores_a_stored_trained_model_on_the_benchmarks_it_lacks(tiny_run, tmp_path):
    """A QLoRA run stored under --bench-trained none (the grid's steps 4-5) gains its trained model's
    ARC / MMLU from the kept adapter when a later call asks with --bench-trained nf4: the same scores
    as a run that scored them while training, on its NF4 row and its +ptq row's copy, and nothing
    else stored changes but the time the scoring took."""
    _, first, _, _ = tiny_run
    out = tmp_path / "tiny.json"
    base = TINY + ["--tag", "tiny", "--out", str(out), "--methods", "qlora", "--bits", "2"]
    accuracy.main(base + ["--bench-trained", "none"])
    before = json.loads(out.read_text())["runs"]
    assert "arc_acc" not in before["qlora|nf4|seed0"]["trained"]
    args = accuracy.parse_args(base + ["--bench-trained", "nf4"])
    assert accuracy.missing_trained_benchmarks(args, "qlora", 0, before) == ["arc", "mmlu"]
    assert not accuracy.is_done(args, ("qlora", 0, None, None, False), before)
    # Elsewhere (no kept adapter) the retrain is not the stored model: its benchmarks are not stored.
    elsewhere = tmp_path / "elsewhere.json"
    moved = json.loads(out.read_text())
    moved["runs"]["qlora|nf4|seed0"]["trained"]["loss"] += 1e-3
    elsewhere.write_text(json.dumps(moved))
    accuracy.main(TINY + ["--tag", "tiny", "--out", str(elsewhere), "--methods", "qlora", "--bits", "2",
                          "--bench-trained", "nf4"])
    assert json.loads(elsewhere.read_text()) == moved
    assert not elsewhere.with_name("elsewhere.json.claims").exists()  # the claim is released all the same
    # ... and the retrain's adapter is not kept as the stored run's (it is another model)
    assert not list(elsewhere.parent.glob("elsewhere.adapters/*")) and not elsewhere.with_name("elsewhere.partial").exists()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pl.Trainer, "fit", lambda *a, **k: pytest.fail("the kept adapter must not be retrained"))
        accuracy.main(base + ["--bench-trained", "nf4"])
    after = json.loads(out.read_text())["runs"]
    assert set(after) == set(before)
    expected = first["runs"]["qlora|nf4|seed0"]["trained"]  # the same model, scored while it was trained
    for key in ("qlora|nf4|seed0", "qlora+ptq|int2_g32|seed0"):
        trained = after[key]["trained"]
        assert trained["loss"] == before[key]["trained"]["loss"]  # the stored scores stay
        for metric in ("arc_acc", "arc_acc_norm", "mmlu_acc"):
            assert trained[metric] == expected[metric] and trained["hits"][metric] == expected["hits"][metric]
        changed = {k for k in after[key] if after[key][k] != before[key].get(k)}
        assert changed == {"trained"} | ({"trained_benchmark_seconds", "trained_benchmark_cpu_seconds"}
                                         if key == "qlora|nf4|seed0" else set())
    assert accuracy.is_done(args, ("qlora", 0, None, None, False), after)
    nf4 = after["qlora|nf4|seed0"]
    hours = accuracy.compute_time({k: {**r, "trained_benchmark_seconds": 3600.0} if "trained_benchmark_seconds" in r
                                   else r for k, r in after.items()})
    assert f"evaluation {(nf4['eval_seconds'] + 3600.0) / 3600:.2f} h" in hours  # one run's scoring + the hour later


def test_the_report_names_retrained_rows_and_counts_runs_per_machine(tiny_run):
    _, _, final, _ = tiny_run
    runs = json.loads(json.dumps(final["runs"]))
    assert accuracy.retrained_note(runs) == ""  # the kept adapter was loaded: the same model
    added = runs["qlora+ptq|int3_g32|seed0"]
    stored_loss = runs["qlora|nf4|seed0"]["trained"]["loss"]
    # As a retrain on another CPU stores it: its own trained scores, a moved loss, its own run and machine.
    other = {"cpu": "Other CPU", "cores": 2, "isa": ["avx2"], "torch": "2.13.0+cpu", "bitsandbytes": "0.50.2"}
    runs["qlora+ptq|int3_g32|seed0"] = {**added, "retrained": True, "trained": {**added["trained"], "loss": stored_loss + 2e-5},
                                        "run": "qlora|nf4|seed0 again for int3_g32 (retrained)", "machine": other}
    note = accuracy.retrained_note(runs)
    assert note.startswith("QLoRA seed 0's INT3 g32 rows come from a retrain that is not bit-identical")
    assert f"trained test loss {stored_loss + 2e-5:.6f} vs the stored run's {stored_loss:.6f}, +2.0e-05" in note
    text = accuracy.compute_time(runs)
    assert f"runs per machine (times compare only within one): {accuracy.machine_label(runs['reference|dense'])}: 4; " \
           "Other CPU, 2 cores, avx2, torch 2.13.0+cpu, bitsandbytes 0.50.2: 1" in text
    assert "runs per machine" not in accuracy.compute_time(final["runs"])  # one machine: nothing to say


def test_tables_show_reference_and_benchmark_metrics(tiny_run, capsys):
    out, _, final, _ = tiny_run
    results = final["runs"]
    assert accuracy.present_metrics(results) == ["loss", "exact_match", "arc_acc", "arc_acc_norm", "mmlu_acc"]
    table = accuracy.summarize(results, "mmlu_acc")
    assert table["reference|dense"]["trained"][2] == 1 and "low_bit" in table["reference|int2_g32"]
    pivot = accuracy.pivot_markdown(results, "arc_acc_norm")
    assert pivot.splitlines()[0].startswith("| deployed as | Unmodified + RTN (no training) | QLoRA + RTN |")
    assert "Unmodified dense model (float32, no training)" in pivot
    assert "| Unmodified model (no training) | INT2 g32 (RTN) | 0 |" in accuracy.markdown_table(results, "loss")

    accuracy.main(TINY + ["--tag", "tiny", "--out", str(out), "--report-only", "--markdown"])
    printed = capsys.readouterr().out
    assert "mmlu_acc on MMLU 1-shot" in printed and "arc_acc_norm on ARC 0-shot" in printed
    assert "CPU time (wall-clock of the runs where each ran): 5 runs" in printed  # 2 references + 3 trainings
    assert "process CPU time (all threads; load and evaluation included)" in printed
    assert out.with_name("tiny_mmlu_acc.png").is_file()


def test_stored_results_keep_their_settings_and_runs():
    """The embedded results made before these options resume unchanged, and their runs are counted once."""
    stored = json.loads((RESULTS / "accuracy_embedded.json").read_text())
    args = accuracy.parse_args([])
    assert set(accuracy.run_settings(args)) == set(stored["settings"])
    settings = accuracy.run_settings(accuracy.parse_args(["--prompt-template", "chat", "--arc", "x.jsonl", "--mmlu-k-shot", "0"]))
    assert settings["prompt_template"] == "chat" and settings["arc"] == "x.jsonl"
    assert "arc_limit" not in settings  # at its default (all questions)
    assert "mmlu_k_shot" not in settings  # no MMLU asked for
    text = accuracy.compute_time(stored["runs"])
    assert text.startswith("CPU time (wall-clock of the runs where each ran): 42 runs")  # 3 seeds x (2 NF4 + 12 QA)


def test_prompt_template_reaches_the_data_module():
    from qblora_pl.data.prompts import resolve_template

    args = accuracy.parse_args(["--prompt-template", "plain"])
    assert accuracy.make_data(args, seed=0).template == resolve_template("plain")


def test_lr_report_chooses_on_validation_files_only(tmp_path):
    sweep = sorted(str(p) for p in RESULTS.glob("accuracy_lr_sweep_val_lr*.json"))
    assert len(sweep) == 2
    report = accuracy.lr_report(sweep)
    assert report.endswith("for the test runs: --method-lr qlora=0.001 qblora=0.003")  # as README's sweep found
    with pytest.raises(SystemExit, match="validation split"):
        accuracy.lr_report([str(RESULTS / "accuracy_embedded.json")])


def test_method_lr_overrides_the_family_lr():
    args = accuracy.parse_args(["--method-lr", "qblora=3e-3", "qablora=0.02"])
    options = vars(args)
    assert accuracy.learning_rate(options, "qblora") == accuracy.learning_rate(options, "qblora+qat") == 3e-3
    assert accuracy.learning_rate(options, "qlora") == 1e-3 and accuracy.learning_rate(options, "qalora") == 1e-2
    assert accuracy.learning_rate(options, "qablora") == 0.02
    assert accuracy.run_settings(args)["method_lr"] == {"qblora": 3e-3, "qablora": 0.02}
    with pytest.raises(SystemExit):
        accuracy.parse_args(["--method-lr", "lora=1e-3"])


def test_lr_criterion_chooses_by_the_trained_or_the_deployed_model(tmp_path):
    """QLoRA's NF4 + adapter and its RTN re-quantization can prefer different LRs; QA-* cannot."""
    def sweep_file(lr: float, qa_lr: float, nf4_loss: float, rtn_loss: float, qa_loss: float) -> str:
        runs = {
            "qlora|nf4|seed0": {"method": "qlora", "trained": {"loss": nf4_loss}, "low_bit": None},
            "qlora+ptq|int3_g32|seed0": {"method": "qlora", "trained": {"loss": nf4_loss}, "low_bit": {"loss": rtn_loss}},
            "qalora|int3_g32|seed0": {"method": "qalora", "trained": {"loss": qa_loss}, "low_bit": {"loss": qa_loss}},
        }
        path = tmp_path / f"val_lr{lr:g}.json"
        path.write_text(json.dumps({"settings": {"eval_split": "val", "lr": lr, "qa_lr": qa_lr}, "runs": runs}))
        return str(path)

    files = [sweep_file(1e-3, 1e-2, 1.88, 3.28, 2.11), sweep_file(3e-3, 3e-3, 2.01, 3.07, 2.09)]
    assert accuracy.lr_report(files).endswith("--method-lr qlora=0.001 qalora=0.003")
    assert accuracy.lr_report(files, criterion="deployed").endswith("--method-lr qlora=0.003 qalora=0.003")
    with pytest.raises(SystemExit, match="criterion"):
        accuracy.lr_report(files, criterion="test")


def test_a_killed_run_resumes_from_its_last_finished_part(tmp_path, monkeypatch):
    """A run killed while scoring its INT2 model keeps its trained adapter and the scores made so
    far (bench/results/<tag>.partial/); the next attempt trains nothing, scores only what is left,
    and stores the rows a run without the interruption stores."""
    import lightning.pytorch as pl

    argv = TINY + ["--tag", "resume", "--bench-trained", "nf4", "--methods", "qlora", "--bits", "2"]
    out = tmp_path / "resumed.json"
    real_call = accuracy.Evaluator.__call__
    parts = []

    def killed_at_the_third(self, model, benchmarks=True):
        parts.append(benchmarks)
        if len(parts) == 3:  # trained, merged, then the INT2 model: killed here
            raise KeyboardInterrupt
        return real_call(self, model, benchmarks)

    monkeypatch.setattr(accuracy.Evaluator, "__call__", killed_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        accuracy.main(argv + ["--out", str(out)])
    partial = tmp_path / "resumed.partial" / "qlora_nf4_seed0"
    assert (partial / "adapter.pt").is_file()
    assert set(json.loads((partial / "scores.json").read_text())) == {"trained", "merged"}
    assert not out.exists() or not json.loads(out.read_text())["runs"]
    for other in ("new_machine", "other_model"):  # the committed scores.json without the adapter
        shutil.copytree(tmp_path / "resumed.partial", tmp_path / f"{other}.partial")
        (tmp_path / f"{other}.partial" / "qlora_nf4_seed0" / "adapter.pt").unlink()
    scores = tmp_path / "other_model.partial" / "qlora_nf4_seed0" / "scores.json"
    tampered = json.loads(scores.read_text())
    tampered["trained"]["scores"]["loss"] += 1e-3
    scores.write_text(json.dumps(tampered))

    parts.clear()
    monkeypatch.setattr(accuracy.Evaluator, "__call__", lambda self, model, benchmarks=True: (
        parts.append(benchmarks), real_call(self, model, benchmarks))[1])
    monkeypatch.setattr(pl.Trainer, "fit", lambda *a, **k: pytest.fail("the saved adapter must not be retrained"))
    accuracy.main(argv + ["--out", str(out)])
    assert parts == [True]  # only the INT2 model was scored (with its benchmarks)
    assert not (tmp_path / "resumed.partial").exists()
    resumed = json.loads(out.read_text())["runs"]

    monkeypatch.undo()
    monkeypatch.setattr(accuracy.Evaluator, "__call__", lambda self, model, benchmarks=True: (
        parts.append(benchmarks), real_call(self, model, benchmarks))[1])
    # A fresh checkout has scores.json but no adapter: it retrains (deterministic), checks the
    # retrained model's held-out loss against the stored one, and scores only the INT2 model.
    parts.clear()
    accuracy.main(argv + ["--out", str(tmp_path / "new_machine.json")])
    assert parts == [False, True]
    new_machine = json.loads((tmp_path / "new_machine.json").read_text())["runs"]
    # Stored parts that are not the retrained model's (here: a tampered loss) are all scored again.
    parts.clear()
    accuracy.main(argv + ["--out", str(tmp_path / "other_model.json")])
    assert parts == [False, True, False, True]  # the check, then trained, merged and INT2
    monkeypatch.undo()

    accuracy.main(argv + ["--out", str(tmp_path / "straight.json")])
    straight = json.loads((tmp_path / "straight.json").read_text())["runs"]
    for runs in (resumed, new_machine):
        assert set(runs) == set(straight) == {"qlora|nf4|seed0", "qlora+ptq|int2_g32|seed0"}
        for key in straight:
            for part in ("trained", "low_bit", "merged"):
                if straight[key].get(part) is not None:
                    for metric in ("loss", "arc_acc", "mmlu_acc"):
                        if metric in straight[key][part]:
                            assert runs[key][part][metric] == pytest.approx(straight[key][part][metric], rel=1e-6), (key, part)
            assert runs[key]["train_seconds"] > 0


def test_a_kept_adapter_is_used_only_under_its_own_settings(tmp_path):
    """A kept adapter made under other settings (another model, LR, steps...) is not loaded."""
    out = tmp_path / "grid.json"
    kept = tmp_path / "grid.adapters" / "qlora_nf4_seed0.pt"
    kept.parent.mkdir()
    torch.save({"state": {}, "train_seconds": 1.0, "settings": {"steps": 200}}, kept)
    assert accuracy.RunProgress(out, "qlora|nf4|seed0", {"steps": 200}, keep=True).adapter_path() == kept
    assert accuracy.RunProgress(out, "qlora|nf4|seed0", {"steps": 100}, keep=True).adapter_path() is None
    assert accuracy.RunProgress(out, "qlora|nf4|seed0", {"steps": 200}).adapter_path() is None  # keep=False
    progress = accuracy.RunProgress(out, "qlora|nf4|seed1", {"steps": 200}, keep=True)
    progress._start()
    torch.save({"state": {}, "train_seconds": 2.0, "settings": {"steps": 200}}, progress.directory / "adapter.pt")
    progress.clear()  # the stored run's adapter moves to the kept folder; its partial folder goes
    assert (tmp_path / "grid.adapters" / "qlora_nf4_seed1.pt").is_file() and not (tmp_path / "grid.partial").exists()


def test_each_scored_part_is_logged_as_it_finishes(tmp_path, capsys):
    """A grid run scores for half an hour: the log says when each part is done, and what it scored."""
    def evaluate(model, **kwargs):
        evaluate.seconds += 12.0
        return {"loss": 2.5, "records": 8, "arc_acc": 0.5, "mmlu_acc": 0.25}
    evaluate.seconds = 0.0
    progress = accuracy.RunProgress(tmp_path / "grid.json", "qablora|int2_g32|seed0", {"steps": 200})
    assert progress.scored("low_bit", evaluate, model=None)["loss"] == 2.5
    assert capsys.readouterr().out == "qablora|int2_g32|seed0: low_bit scored (loss 2.5000, arc_acc 0.5000, mmlu_acc 0.2500; 12s)\n"
    progress.scored("low_bit", evaluate, model=None)  # stored now: reused, not scored again
    assert capsys.readouterr().out == "qablora|int2_g32|seed0: low_bit scored by an interrupted attempt; reused\n"


def test_alpha_sets_every_methods_scaling_and_stays_out_of_older_files_settings():
    assert "alpha" not in accuracy.run_settings(accuracy.parse_args([]))  # files made before --alpha still match
    assert accuracy.run_settings(accuracy.parse_args(["--alpha", "64"]))["alpha"] == 64.0
    for method in accuracy.METHODS:
        _, default = accuracy.build(method, 32, 3, 32)
        _, scaled = accuracy.build(method, 32, 3, 32, alpha=64.0)
        assert default.alpha == 16.0 and scaled.alpha == 64.0
