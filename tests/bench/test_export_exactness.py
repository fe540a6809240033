"""bench/export_exactness.py: the comparison numbers, the weight count and the runtime registry."""

from __future__ import annotations

import numpy as np
import pytest

from bench import export_exactness


def test_compare_reports_max_diff_its_ratio_to_the_spread_and_greedy_agreement():
    reference = [np.array([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]]), np.array([[1.0, 0.0, 0.0]])]
    other = [np.array([[0.0, 1.0, 1.5], [3.0, 0.0, 0.5]]), np.array([[1.0, 0.0, 0.25]])]
    result = export_exactness.compare(reference, other)
    assert result["max_abs_logit_diff"] == 1.0
    spread = np.concatenate(reference).std()
    assert result["max_abs_logit_diff_over_std"] == pytest.approx(1.0 / spread)
    # argmax: row 1 flips (1 -> 2), rows 2 and 3 agree
    assert result["greedy_agreement"] == pytest.approx(2 / 3) and result["positions"] == 3


def test_weight_count_counts_int_b_layers_as_dense_and_skips_adapters(tiny_model_dir):
    from tests.export.conftest import adapted_module

    module = adapted_module(tiny_model_dir, "qablora")
    config = module.model.config
    h, i, v, n = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_hidden_layers
    per_layer = 4 * h * h + 3 * h * i + 2 * h  # q k v o (4 heads, no GQA), gate up down, two norms
    head = 0 if config.tie_word_embeddings else v * h
    assert export_exactness.model_weight_count(module.model) == v * h + n * per_layer + h + head


def test_every_runtime_reads_a_format_the_exporter_writes():
    from qblora_pl.export.exporter import EXPORT_FORMATS, ON_REQUEST_FORMATS

    assert export_exactness.REFERENCE.export_format in EXPORT_FORMATS
    for name, runtime in export_exactness.RUNTIMES.items():
        assert runtime.export_format in EXPORT_FORMATS + ON_REQUEST_FORMATS, name
