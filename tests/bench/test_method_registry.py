"""The benchmarks' methods come from configs/<method>.yaml: bench/accuracy_lib/methods.py's build() returns
the base and adapter the benchmark has always trained (explicit hparams below), overriding only what it varies."""

from __future__ import annotations

import pytest

from bench.accuracy_lib.methods import build, from_config

NF4 = {"backend": "NF4", "quant_type": "nf4", "double_quant": True, "compute_dtype": "auto"}


def int_base(bits, group_size, **calibration):
    return {"backend": "GroupwiseInt", "bits": bits, "group_size": group_size, "scale_dtype": "float16",
            "compute_dtype": "auto", **calibration}


GPTQ = {"init": "gptq", "calibration_records": 64, "calibration_seq_len": 256}

CASES = [  # (method, build's arguments, quantization.describe(), adapter class, adapter.hparams())
    ("qlora", dict(rank=8, bits=3, group_size=32), NF4, "LoRA", {"dropout": 0.0, "r": 8, "alpha": 16.0}),
    ("qblora", dict(rank=8, bits=3, group_size=32), NF4, "QBLoRA",
     {"dropout": 0.0, "r": 8, "alpha": 16.0, "k_in": 2, "k_out": 2, "rank_multiplier": 2}),
    ("qalora", dict(rank=8, bits=3, group_size=32), int_base(3, 32), "QALoRA",
     {"dropout": 0.0, "r": 8, "alpha": 16.0, "pool_window": None, "scale_rank": 0}),
    ("qablora", dict(rank=8, bits=3, group_size=32), int_base(3, 32), "QABLoRA",
     {"dropout": 0.0, "budget_rank": 8, "alpha": 16.0, "k_out": None, "pool_window": None, "scale_rank": 0}),
    # --rank 32 --alpha 64 at INT2 g64: the NF4 methods ignore the width
    ("qlora", dict(rank=32, bits=2, group_size=64, alpha=64.0), NF4, "LoRA", {"dropout": 0.0, "r": 32, "alpha": 64.0}),
    ("qblora", dict(rank=32, bits=2, group_size=64, alpha=64.0), NF4, "QBLoRA",
     {"dropout": 0.0, "r": 32, "alpha": 64.0, "k_in": 2, "k_out": 2, "rank_multiplier": 2}),
    ("qalora", dict(rank=32, bits=2, group_size=64, alpha=64.0), int_base(2, 64), "QALoRA",
     {"dropout": 0.0, "r": 32, "alpha": 64.0, "pool_window": None, "scale_rank": 0}),
    ("qablora", dict(rank=32, bits=2, group_size=64, alpha=64.0), int_base(2, 64), "QABLoRA",
     {"dropout": 0.0, "budget_rank": 32, "alpha": 64.0, "k_out": None, "pool_window": None, "scale_rank": 0}),
    # --base-init gptq and --scale-rank 4: QA-*'s base and adapter only
    ("qlora", dict(rank=9, bits=4, group_size=32, alpha=18.0, base=GPTQ, scale_rank=4), NF4, "LoRA",
     {"dropout": 0.0, "r": 9, "alpha": 18.0}),
    ("qblora", dict(rank=9, bits=4, group_size=32, base=GPTQ, scale_rank=4), NF4, "QBLoRA",
     {"dropout": 0.0, "r": 9, "alpha": 16.0, "k_in": 2, "k_out": 2, "rank_multiplier": 2}),
    ("qalora", dict(rank=9, bits=4, group_size=32, alpha=18.0, base=GPTQ, scale_rank=4), int_base(4, 32, **GPTQ),
     "QALoRA", {"dropout": 0.0, "r": 9, "alpha": 18.0, "pool_window": None, "scale_rank": 4}),
    ("qablora", dict(rank=9, bits=4, group_size=32, base=GPTQ, scale_rank=4), int_base(4, 32, **GPTQ), "QABLoRA",
     {"dropout": 0.0, "budget_rank": 9, "alpha": 16.0, "k_out": None, "pool_window": None, "scale_rank": 4}),
]


@pytest.mark.parametrize("method, arguments, described, adapter_class, hparams", CASES)
def test_build_gives_the_benchmarks_methods(method, arguments, described, adapter_class, hparams):
    quantization, adapter = build(method, **arguments)
    assert quantization.describe() == described
    assert type(adapter).__name__ == adapter_class
    assert adapter.hparams() == hparams


def test_an_unknown_method_is_refused():
    with pytest.raises(ValueError, match="unknown method 'lora'"):
        build("lora", 8, 4, 32)


def test_from_config_reads_a_config_file_and_overrides_only_what_it_is_given(tmp_path):
    config = tmp_path / "mine.yaml"
    config.write_text("model:\n"
                      "  quantization:\n    class_path: qblora_pl.quantization.GroupwiseInt\n"
                      "    init_args: {bits: 4, group_size: 64, scale_dtype: bfloat16}\n"
                      "  adapter:\n    class_path: qblora_pl.adapters.QABLoRA\n"
                      "    init_args: {budget_rank: 4, alpha: 8, dropout: 0.1}\n")
    quantization, adapter = from_config(config, quantization={"bits": 2}, adapter={"dropout": 0.0})
    assert quantization.describe() == {"backend": "GroupwiseInt", "bits": 2, "group_size": 64,
                                       "scale_dtype": "bfloat16", "compute_dtype": "auto"}
    assert adapter.hparams() == {"dropout": 0.0, "budget_rank": 4, "alpha": 8, "k_out": None, "pool_window": None,
                                 "scale_rank": 0}
