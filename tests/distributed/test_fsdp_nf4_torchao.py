"""QLoRA / Q-BLoRA on an NF4 base sharded by FSDP2: torchao's NF4Tensor on 2 CPU processes (gloo).

The same harness as ``test_fsdp.py`` (``fsdp_worker.py`` launched as a script, the one-process
reference in this process, dropout 0, global batch 8). The base is ``NF4(implementation="torchao",
scaler_block_size=32)``: the test model's 64 x 64 layers have 64 NF4 blocks, so 32 blocks per
double-quantization factor gives 2 factors per layer, which 2 ranks divide (torchao's default
256 gives 1: ``test_nf4_torchao_layer_that_does_not_divide_is_named`` below). Tolerances as in
``test_fsdp.py``: losses 1e-5 relative in fp32.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed.test_fsdp import (
    LOSS_RTOL, assert_trains_like_one_process, global_losses, launch, rank_results, run_in_process,
)

pytest.importorskip("torchao", reason="NF4(implementation='torchao') needs the fsdp-nf4 extra")


def _native_tensors(export_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(export_dir / "native" / "model.safetensors"))


@pytest.mark.slow
def test_torchao_nf4_qblora_on_two_processes_matches_one_resumes_and_exports(tiny_model_dir, tiny_data_dir, tmp_path):
    common = {"model_dir": str(tiny_model_dir), "data_dir": str(tiny_data_dir), "method": "qblora",
              "backend": "nf4_torchao", "lr": 3e-3, "batch_size": 8}
    fsdp_ckpt, single_ckpt = tmp_path / "fsdp.ckpt", tmp_path / "single.ckpt"
    launch({**common, "out_dir": str(tmp_path / "fsdp"), "devices": 2, "max_epochs": 1, "save": str(fsdp_ckpt),
            "export_dir": str(tmp_path / "fsdp_export")}, tmp_path)
    ranks = rank_results(tmp_path / "fsdp", 2)
    single = run_in_process({**common, "out_dir": str(tmp_path / "single"), "max_epochs": 1, "save": str(single_ckpt),
                             "export_dir": str(tmp_path / "single_export")})

    assert_trains_like_one_process(ranks, single)

    # Each rank holds half of the NF4 base (codes, int8 scales, factors) and of the rest; what
    # is not split is each NF4 weight's replicated mean scale and 16-level table (68 bytes).
    one = single["base_weight_bytes"]
    n_nf4 = sum(1 for n, m in single["module"].model.named_modules() if type(m).__name__ == "TorchaoNF4Linear")
    assert [r["base_weight_bytes"] for r in ranks] == [(one - 68 * n_nf4) // 2 + 68 * n_nf4] * 2, (one, ranks)

    # The checkpoint is one adapter-only file; it resumes at world size 1 as the one-process run does.
    ckpt = torch.load(fsdp_ckpt, weights_only=False)
    assert set(ckpt["state_dict"]) == single["module"].trainable_names() and ckpt["world_size"] == 2
    cont_single = run_in_process({**common, "out_dir": str(tmp_path / "c1"), "max_epochs": 2, "resume": str(single_ckpt)})
    cont_fsdp = run_in_process({**common, "out_dir": str(tmp_path / "c2"), "max_epochs": 2, "resume": str(fsdp_ckpt)})
    assert len(cont_fsdp["losses"]) == 7
    assert cont_fsdp["losses"] == pytest.approx(cont_single["losses"], rel=LOSS_RTOL)

    # The export after the FSDP run is the one-process run's: the NF4 base dequantized the same
    # way (W_hat + dW merged dense, re-quantized to INT4 by the native writer), embeddings and
    # norms bit for bit; merged layers equal up to the fp32 round-off of the adapters.
    fsdp_export, single_export = _native_tensors(tmp_path / "fsdp_export"), _native_tensors(tmp_path / "single_export")
    assert fsdp_export.keys() == single_export.keys()
    for key in fsdp_export:
        assert fsdp_export[key].dtype == single_export[key].dtype, key
        if key.endswith((".codes", ".packed_codes", ".qweight")):
            agree = (fsdp_export[key] == single_export[key]).float().mean().item()
            assert agree >= 0.999, (key, agree)
        elif key.endswith((".scales", ".offsets")):
            torch.testing.assert_close(fsdp_export[key].float(), single_export[key].float(), rtol=0, atol=1e-5, msg=key)
        else:
            assert torch.equal(fsdp_export[key], single_export[key]), key
    # (The reports' verification perplexities differ: under FSDP rank 0 verifies on its own share
    # of the validation batch.) The merge read the torchao NF4 weights, it did not skip them:
    report = json.loads((tmp_path / "fsdp_export" / "export_report.json").read_text())
    assert report["formats"]["native"]["verification"]["argmax_agreement"] > 0.9


@pytest.mark.slow
def test_torchao_nf4_checkpoint_of_one_process_resumes_on_two_and_on_one_fsdp_rank(tiny_model_dir, tiny_data_dir, tmp_path):
    common = {"model_dir": str(tiny_model_dir), "data_dir": str(tiny_data_dir), "method": "lora",
              "backend": "nf4_torchao", "lr": 3e-3}
    single_ckpt = tmp_path / "single.ckpt"
    run_in_process({**common, "out_dir": str(tmp_path / "s"), "max_epochs": 1, "save": str(single_ckpt)})
    reference = run_in_process({**common, "out_dir": str(tmp_path / "r"), "max_epochs": 2, "resume": str(single_ckpt)})
    launch({**common, "out_dir": str(tmp_path / "w2"), "devices": 2, "max_epochs": 2, "resume": str(single_ckpt)}, tmp_path)
    resumed = global_losses(rank_results(tmp_path / "w2", 2))
    assert len(resumed) == 7
    assert resumed == pytest.approx(reference["losses"], rel=LOSS_RTOL)
    # FSDP2Strategy on one rank too (configs/fsdp.yaml with --trainer.devices 1): the model stays
    # unsharded there (shard_model), and trains as the plain one-device run does.
    launch({**common, "out_dir": str(tmp_path / "w1"), "devices": 1, "max_epochs": 2, "resume": str(single_ckpt)}, tmp_path)
    one_rank = rank_results(tmp_path / "w1", 1)[0]
    assert not one_rank["sharded"] and one_rank["losses"] == pytest.approx(reference["losses"], rel=LOSS_RTOL)


# ---------------------------------------------------------------------------------------- fast
class _Mesh:
    """A 1-D data-parallel mesh of ``size`` ranks, as far as the checks before fully_shard look."""

    mesh_dim_names = ("data_parallel",)

    def __init__(self, size: int) -> None:
        self._size = size

    def size(self) -> int:
        return self._size

    def __getitem__(self, name):
        return self


def test_nf4_torchao_layer_that_does_not_divide_is_named(tiny_model_dir):
    """torchao's default scaler block (256) leaves the 64 x 64 layers one factor each: 2 ranks cannot
    split it. The error names the layer, its numbers and the scaler_block_size that works."""
    from qblora_pl.distributed import ShardingNotSupported, shard_model
    from qblora_pl.quantization import NF4

    model = NF4(implementation="torchao").load(str(tiny_model_dir))
    with pytest.raises(ShardingNotSupported) as error:
        shard_model(model, device_mesh=_Mesh(2))
    message = str(error.value)
    assert message.startswith("layer model.layers.0.self_attn.q_proj: its torchao NF4 weight (64 x 64: 64 blocks of 64, "
                              "1 double-quantization factor(s) of scaler_block_size=64 blocks) cannot be sharded by FSDP2 "
                              "over world size 2"), message
    assert "scaler_block_size: 32" in message and "(13 more layer(s) cannot either)" in message

    rows = NF4(implementation="torchao", scaler_block_size=1).load(str(tiny_model_dir))
    with pytest.raises(ShardingNotSupported, match=r"layer model\.layers\.0\.self_attn\.q_proj: .*its 64 rows are not divisible by 3"):
        shard_model(rows, device_mesh=_Mesh(3))


def test_nf4_torchao_with_small_scaler_blocks_passes_the_check(tiny_model_dir):
    from qblora_pl.distributed import check_nf4_shards
    from qblora_pl.quantization import NF4

    model = NF4(implementation="torchao", scaler_block_size=32).load(str(tiny_model_dir))
    check_nf4_shards(model, 2)  # 2 (64 x 64) and 4 (128 x 64) factors per layer
    with pytest.raises(ValueError, match="world size 4"):
        check_nf4_shards(model, 4)


def test_bitsandbytes_refusal_points_to_torchao(tiny_model_dir):
    from qblora_pl.distributed import ShardingNotSupported, shard_model
    from qblora_pl.quantization import NF4

    with pytest.raises(ShardingNotSupported, match=r"accelerate issue #3983\). Under FSDP use NF4 on torchao \(--model\.quantization\.init_args\.implementation torchao"):
        shard_model(NF4().load(str(tiny_model_dir)), device_mesh=_Mesh(2))
