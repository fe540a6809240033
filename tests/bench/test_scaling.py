"""bench/scaling.py and the memory split of bench/step_cost.py: the shapes' parameter counts are the
model's, and one real step_cost case splits its peak into parts that add up."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench import scaling  # noqa: E402


@pytest.mark.parametrize("size", list(scaling.SIZES))
def test_parameter_count_is_the_llama_models(size):
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = {**scaling.SIZES[size], **scaling.COMMON_SHAPE}
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**shape))
    assert scaling.parameter_count(shape) == sum(p.numel() for p in model.parameters())


def test_step_cost_case_splits_its_peak_and_saves_no_dense_weight(tmp_path):
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "step_cost.py"), "--case", "qablora", "--batch-size", "2", "--seq-len", "16",
         "--steps", "1", "--warmup", "1", "--threads", "1"],
        capture_output=True, text=True, cwd=REPO, timeout=300, check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    split = result["memory_split_bytes"]
    assert set(split) == {"base", "adapter_optimizer", "activations", "transient", "resident_other"}
    assert split["base"] > 0 and split["adapter_optimizer"] > 0 and split["activations"] > 0
    assert sum(split.values()) == result["total_peak_bytes"]
    # the embedded model's quantized layers are 64 x 64, 64 x 128, 128 x 64: no such tensor is saved
    assert not [s for _, s, _ in result["largest_saved"] if tuple(s) in {(64, 64), (128, 64), (64, 128)}]


def test_seven_b_estimate_scales_each_component_by_its_driver():
    args = type("A", (), {"batch_size": 2, "seq_len": 128})()
    mib = 2**20
    result = {"memory_split_bytes": {"base": 1000 * mib, "adapter_optimizer": 100 * mib, "activations": 800 * mib,
                                     "transient": 1500 * mib, "resident_other": 50 * mib}}
    est = scaling.estimate_7b(result, "1.5b", args)
    small, big = {**scaling.SIZES["1.5b"], **scaling.COMMON_SHAPE}, scaling.LLAMA2_7B
    tokens_layers_hidden = lambda s: s["num_hidden_layers"] * s["hidden_size"]  # noqa: E731
    assert est["activations"] == pytest.approx(800 * mib * tokens_layers_hidden(big) / tokens_layers_hidden(small), rel=1e-6)
    assert est["base"] > 1000 * mib and est["adapter_optimizer"] > 100 * mib
