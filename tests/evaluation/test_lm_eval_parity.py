"""Peer check against lm-evaluation-harness (slow: imports lm-eval and runs both sides)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))


@pytest.mark.slow
def test_multiple_choice_accuracy_equals_lm_eval_harness():
    pytest.importorskip("lm_eval")
    import lm_eval_parity

    # the embedded model and records: the first 60 zero-shot questions, the first 10 of each MMLU subject
    report = lm_eval_parity.compare(limit=60, k_shot=5, batch_size=16, mmlu_limit_per_subject=10, log=lambda _: None)
    for task, result in report.items():
        assert result["agreement"] == 1.0, (task, result)
        assert result["prompts_identical"] == 1.0, (task, result)
        assert result["max_abs_ll_diff"] < 1e-3, (task, result)
        assert result["ours_acc"] == pytest.approx(result["lm_eval_acc"], abs=1e-6), (task, result)
    assert report["zero_shot"]["ours_acc_norm"] == pytest.approx(report["zero_shot"]["lm_eval_acc_norm"], abs=1e-6)
    assert report["mmlu_5shot"]["scoring"] == "letter_logits"
