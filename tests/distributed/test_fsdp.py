"""FSDP2 on 2 CPU processes (gloo) against one process: losses, gradients, memory, resume, export.

Multi-process runs go through ``fsdp_worker.py`` in a subprocess, so that Lightning's launcher
forks that script rather than pytest. Dropout is 0 so both runs draw no random numbers; the
global batch is 8 in both (4 per rank under FSDP). Tolerances: losses 1e-5 relative in fp32
(measured 1.7e-7 over 14 steps with gradient clipping active), adapters 1e-6 absolute.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("fsdp_worker.py")
LOSS_RTOL = 1e-5


def launch(spec: dict, tmp_path: Path, check: bool = True) -> subprocess.CompletedProcess:
    spec_path = tmp_path / f"spec-{Path(spec['out_dir']).name}.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run([sys.executable, str(WORKER), str(spec_path)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        pytest.fail(f"worker failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def rank_results(out_dir: Path, world: int) -> list[dict]:
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world)]


def run_in_process(spec: dict) -> dict:
    """The one-process reference: the same worker code, plain single-device strategy."""
    from tests.distributed.fsdp_worker import build

    module, data, trainer, recorder = build({**spec, "devices": 1, "strategy": "single"})
    trainer.fit(module, datamodule=data, ckpt_path=spec.get("resume"))
    if spec.get("save"):
        trainer.save_checkpoint(spec["save"])
    from qblora_pl.distributed import base_weight_bytes

    return {"losses": recorder.losses, "grad_norms": recorder.grad_norms, "module": module,
            "base_weight_bytes": base_weight_bytes(module.model)}


def global_losses(ranks: list[dict]) -> list[float]:
    """Each rank returns its token sum over (global tokens / world): their mean is the global mean."""
    return [sum(step) / len(ranks) for step in zip(*(r["losses"] for r in ranks))]


def assert_trains_like_one_process(ranks: list[dict], single: dict) -> None:
    """The same global batch and order (7 steps; clipping at 0.3 is active) give one process's losses and
    gradient norms, real ones (the NF4/uint8 trap trains with zero loss and NaN grads), and a falling loss."""
    fsdp_losses = global_losses(ranks)
    assert len(fsdp_losses) == len(single["losses"]) == 7
    assert fsdp_losses == pytest.approx(single["losses"], rel=LOSS_RTOL)
    for rank in ranks:
        assert rank["sharded"] and rank["world_size"] == 2
        assert all(0 < g < float("inf") for g in rank["grad_norms"]), rank["grad_norms"]
        assert rank["grad_norms"] == pytest.approx(single["grad_norms"], rel=1e-4)
    assert fsdp_losses[-1] < fsdp_losses[0] - 0.1, fsdp_losses


def assert_same_native_export(a: Path, b: Path, offsets_atol: float) -> None:
    ta, tb = load_file(str(a / "native" / "model.safetensors")), load_file(str(b / "native" / "model.safetensors"))
    assert ta.keys() == tb.keys()
    assert any(k.endswith(".offsets") for k in ta)
    for key in ta:
        assert ta[key].dtype == tb[key].dtype, key
        if key.endswith(".offsets"):
            torch.testing.assert_close(ta[key], tb[key], rtol=0, atol=offsets_atol, msg=key)
        else:  # codes, scales, embeddings, norms: the same low-bit model bit for bit
            assert torch.equal(ta[key], tb[key]), key


def test_two_process_fsdp_matches_one_process_resumes_and_exports(tiny_model_dir, tiny_data_dir, tmp_path):
    common = {"model_dir": str(tiny_model_dir), "data_dir": str(tiny_data_dir), "method": "qablora",
              "lr": 1e-2, "batch_size": 8}
    fsdp_ckpt = tmp_path / "fsdp.ckpt"
    launch({**common, "out_dir": str(tmp_path / "fsdp"), "devices": 2, "max_epochs": 1,
            "save": str(fsdp_ckpt), "export_dir": str(tmp_path / "fsdp_export")}, tmp_path)
    ranks = rank_results(tmp_path / "fsdp", 2)

    single_ckpt = tmp_path / "single.ckpt"
    single = run_in_process({**common, "out_dir": str(tmp_path / "single"), "max_epochs": 1,
                             "save": str(single_ckpt), "export_dir": str(tmp_path / "single_export")})

    assert_trains_like_one_process(ranks, single)
    # The frozen base is sharded: each of 2 ranks holds half of what one process holds.
    one = single["base_weight_bytes"]
    assert [r["base_weight_bytes"] for r in ranks] == [one // 2, one // 2], (one, ranks)
    # The INT-b layers save their gathered packed codes for backward, not a dense W_hat, and FSDP2
    # frees that gathered storage after each layer's forward (it gathers again for the backward).
    for r in ranks:
        saved = r["saved_tensors"]
        assert saved["weight_shaped_float"] == [] and saved["saved_codes"] > 0, saved
        assert saved["saved_codes_freed"] == saved["saved_codes"], saved

    # The FSDP checkpoint is one adapter-only file in one-device format.
    ckpt = torch.load(fsdp_ckpt, weights_only=False)
    assert set(ckpt["state_dict"]) == single["module"].trainable_names() and ckpt["world_size"] == 2
    assert set(ckpt["optimizer_states"][0]["state"]) == set(range(len(ckpt["state_dict"])))

    # It resumes - here at world size 1 (a reshard) - and continues as the one-process run does.
    cont_single = run_in_process({**common, "out_dir": str(tmp_path / "c1"), "max_epochs": 2, "resume": str(single_ckpt)})
    cont_fsdp = run_in_process({**common, "out_dir": str(tmp_path / "c2"), "max_epochs": 2, "resume": str(fsdp_ckpt)})
    assert len(cont_fsdp["losses"]) == 7
    assert cont_fsdp["losses"] == pytest.approx(cont_single["losses"], rel=LOSS_RTOL)

    # Export after the FSDP run = export after the one-process run: same codes, scales and
    # embeddings bit for bit; merged offsets equal to fp32 round-off of the adapters.
    assert_same_native_export(tmp_path / "fsdp_export", tmp_path / "single_export", offsets_atol=1e-6)
    # And the FSDP run's own export is exactly what its checkpoint exports in one process.
    from qblora_pl.export.exporter import export_from_checkpoint

    export_from_checkpoint(None, fsdp_ckpt, tmp_path / "from_ckpt", formats=["native"], verify=False, log=lambda _: None)
    assert_same_native_export(tmp_path / "fsdp_export", tmp_path / "from_ckpt", offsets_atol=0)
    report = json.loads((tmp_path / "fsdp_export" / "export_report.json").read_text())
    assert report["formats"]["native"]["verification"]["max_abs_logit_diff"] < 1e-4


# ---------------------------------------------------------------------------------------- slow
@pytest.mark.slow
def test_fsdp_checkpoints_resume_at_the_same_and_a_larger_world_size(tiny_model_dir, tiny_data_dir, tmp_path):
    common = {"model_dir": str(tiny_model_dir), "data_dir": str(tiny_data_dir), "method": "qablora", "lr": 1e-2}
    fsdp_ckpt, single_ckpt = tmp_path / "fsdp.ckpt", tmp_path / "single.ckpt"
    launch({**common, "out_dir": str(tmp_path / "a"), "devices": 2, "max_epochs": 1, "save": str(fsdp_ckpt)}, tmp_path)
    run_in_process({**common, "out_dir": str(tmp_path / "s"), "max_epochs": 1, "save": str(single_ckpt)})
    reference = run_in_process({**common, "out_dir": str(tmp_path / "r"), "max_epochs": 2, "resume": str(single_ckpt)})
    for name, ckpt in (("2->2", fsdp_ckpt), ("1->2", single_ckpt)):
        out = tmp_path / name.replace("->", "_")
        launch({**common, "out_dir": str(out), "devices": 2, "max_epochs": 2, "resume": str(ckpt)}, tmp_path)
        resumed = global_losses(rank_results(out, 2))
        assert resumed == pytest.approx(reference["losses"], rel=LOSS_RTOL), name


@pytest.mark.slow
@pytest.mark.parametrize("method,grad_ckpt", [("qablora", True), ("lora", False), ("qalora", False), ("qblora", True),
                                              ("qablora_scales", True)])
def test_fsdp_parity_for_each_method_and_with_activation_checkpointing(method, grad_ckpt, tiny_model_dir, tiny_data_dir, tmp_path):
    common = {"model_dir": str(tiny_model_dir), "data_dir": str(tiny_data_dir), "method": method,
              "lr": 1e-2 if method.startswith("qa") else 3e-3, "max_epochs": 1}
    launch({**common, "out_dir": str(tmp_path / "f"), "devices": 2, "gradient_checkpointing": grad_ckpt}, tmp_path)
    single = run_in_process({**common, "out_dir": str(tmp_path / "s")})
    ranks = rank_results(tmp_path / "f", 2)
    assert global_losses(ranks) == pytest.approx(single["losses"], rel=LOSS_RTOL)
    assert all(0 < g < float("inf") for g in ranks[0]["grad_norms"])


@pytest.mark.slow
def test_world_size_that_does_not_divide_the_batch_is_named(tiny_model_dir, tiny_data_dir, tmp_path):
    proc = launch({"model_dir": str(tiny_model_dir), "data_dir": str(tiny_data_dir), "out_dir": str(tmp_path / "x"),
                   "devices": 2, "batch_size": 7, "max_steps": 1}, tmp_path, check=False)
    assert proc.returncode != 0
    assert "data.batch_size=7 is the global batch under FSDP2Strategy and must be divisible by the world size 2" in proc.stderr


@pytest.mark.slow
def test_nf4_base_is_refused_under_fsdp_before_training(tiny_model_dir, tiny_data_dir, tmp_path):
    proc = launch({"model_dir": str(tiny_model_dir), "data_dir": str(tiny_data_dir), "out_dir": str(tmp_path / "x"),
                   "devices": 2, "backend": "nf4", "method": "lora", "max_steps": 1}, tmp_path, check=False)
    assert proc.returncode != 0 and "accelerate issue #3983" in proc.stderr and "GroupwiseInt" in proc.stderr


# ---------------------------------------------------------------------------------------- fast
def test_nf4_model_is_refused_by_shard_model(tiny_model_dir):
    from qblora_pl.distributed import ShardingNotSupported, shard_model
    from qblora_pl.quantization import NF4

    model = NF4().load(str(tiny_model_dir))
    with pytest.raises(ShardingNotSupported, match=r"layer model\.layers\.0\..* bitsandbytes 4-bit.*GroupwiseInt"):
        shard_model(model, device_mesh=None)


class _FakeMesh:
    mesh_dim_names = ("data_parallel", "tensor_parallel")

    def __init__(self, dp: int, tp: int) -> None:
        self.sizes = {"data_parallel": dp, "tensor_parallel": tp}

    def __getitem__(self, name):
        size = self.sizes[name]
        return type("Sub", (), {"size": lambda self: size})()


def test_tensor_parallel_mesh_is_refused_with_its_sizes():
    from qblora_pl.distributed import ShardingNotSupported, data_parallel_mesh

    with pytest.raises(ShardingNotSupported, match="tensor_parallel_size=4 and data_parallel_size=1.*FSDP2Strategy"):
        data_parallel_mesh(_FakeMesh(1, 4))
    assert data_parallel_mesh(_FakeMesh(4, 1)).size() == 4


def test_fsdp1_strategy_is_refused_and_named():
    from lightning.pytorch.strategies import FSDPStrategy

    from qblora_pl.distributed import ShardingNotSupported, check_strategy

    with pytest.raises(ShardingNotSupported, match="FSDPStrategy \\(FSDP1\\) is not supported.*configs/fsdp.yaml"):
        check_strategy(FSDPStrategy())


def test_global_batch_split_names_batch_and_world_size(tiny_model_dir, tiny_data_dir):
    from qblora_pl.data.datamodule import InstructionDataModule

    data = InstructionDataModule(str(tiny_data_dir), tokenizer_name_or_path=str(tiny_model_dir), batch_size=8)
    strategy = type("S", (), {"splits_global_batch": True})()
    data.trainer = type("T", (), {"strategy": strategy, "world_size": 3, "num_nodes": 1})()
    with pytest.raises(ValueError, match=r"data.batch_size=8 is the global batch .* world size 3 \(num_nodes 1 x devices 3\)"):
        data.device_batch_size(8)
    data.trainer.world_size = 4
    assert data.device_batch_size(8) == 2
    strategy.splits_global_batch = False  # any other strategy keeps Lightning's per-device meaning
    assert data.device_batch_size(8) == 8


def test_rank_share_sampler_splits_each_global_batch_in_one_device_order():
    from qblora_pl.data.sampler import LengthGroupedSampler, RankShareSampler

    lengths = [5, 9, 2, 7, 3, 8, 1, 6, 4, 10, 11, 12]
    order = LengthGroupedSampler(lengths, batch_size=4, seed=3).order(epoch=1)
    shares = []
    for rank in range(2):
        sampler = RankShareSampler(LengthGroupedSampler(lengths, batch_size=4, seed=3), 2, rank)
        sampler.set_epoch(1)
        shares.append(list(sampler))
    for i in range(3):  # global batch i (4 examples) = rank 0's 2 + rank 1's 2
        assert sorted(shares[0][2 * i : 2 * i + 2] + shares[1][2 * i : 2 * i + 2]) == sorted(order[4 * i : 4 * i + 4])


def test_sharded_checkpoint_directory_is_refused(tmp_path):
    from qblora_pl.distributed import FSDP2Strategy

    (tmp_path / "ckpt").mkdir()
    with pytest.raises(ValueError, match="is a directory .*single-file adapter checkpoints"):
        FSDP2Strategy().load_checkpoint(tmp_path / "ckpt")


@pytest.mark.slow
def test_composed_cli_config_trains_checkpoints_resumes_and_exports_on_two_processes(tiny_model_dir, tiny_data_dir, tmp_path):
    """`main.py fit --config configs/qablora.yaml --config configs/fsdp.yaml --trainer.devices 2`, end to end,
    with every callback of the method config (QAT switched on early, export in all three formats)."""
    override = tmp_path / "small.yaml"
    override.write_text(
        "trainer:\n  max_steps: 4\n  val_check_interval: 2\n  limit_val_batches: 1\n  log_every_n_steps: 1\n"
        "  callbacks:\n"
        "    - class_path: qblora_pl.callbacks.AdapterCheckpoint\n      init_args: {save_last: true, every_n_train_steps: 2}\n"
        "    - class_path: qblora_pl.callbacks.RankBalanceDiagnostics\n      init_args: {every_n_steps: 1}\n"
        "    - class_path: qblora_pl.callbacks.QATSchedule\n      init_args: {start_step: 1, ramp_steps: 1, log_every_n_steps: 1}\n"
        "    - class_path: qblora_pl.callbacks.MergeExport\n      init_args: {output_dir: exports, formats: [native, gguf, hf]}\n"
    )
    base = [sys.executable, str(REPO / "main.py"), "fit", "--config", str(REPO / "configs/qablora.yaml"),
            "--config", str(REPO / "configs/fsdp.yaml"), "--config", str(override), "--trainer.devices", "2",
            "--trainer.accelerator", "cpu", "--model.model_name_or_path", str(tiny_model_dir),
            "--data.data_path", str(tiny_data_dir), "--trainer.default_root_dir", str(tmp_path / "run")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(base, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # The config's relative logger save_dir (runs/) moves under --trainer.default_root_dir, and the export
    # into that run's log dir (runs/qablora/version_0/exports).
    (last,) = (tmp_path / "run" / "runs").rglob("last.ckpt")
    ckpt = torch.load(last, weights_only=False)
    assert ckpt["global_step"] == 4 and ckpt["world_size"] == 2 and all("balanced_M" in k for k in ckpt["state_dict"])
    report = json.loads((last.parents[1] / "exports" / "export_report.json").read_text())
    assert set(report["formats"]) == {"native", "gguf", "hf"}
    assert report["formats"]["native"]["verification"]["max_abs_logit_diff"] < 1e-4
    resumed = subprocess.run(base + ["--trainer.max_steps", "6", "--ckpt_path", str(last)], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    newest = max((tmp_path / "run" / "runs").rglob("last.ckpt"), key=lambda p: p.stat().st_mtime)  # the resumed run's
    assert newest != last and torch.load(newest, weights_only=False)["global_step"] == 6
