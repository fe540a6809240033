"""scripts/gpu_check.py's dry run: the code the CUDA check runs, on CPU with tiny sizes, so it cannot rot.

The GPU itself is never needed: ``--dry-run`` allows the CPU and shrinks the 1B Llama to 2 layers.
The pytest-in-pytest section (``gpu_tests``) and the embedded-model section (the same ``methods``
code as the tiny Llama's) are skipped here to keep the default suite fast.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dry_run_trains_every_method_checks_the_int4_kernel_and_decodes(tmp_path):
    gpu_check = _gpu_check()
    out = tmp_path / "report.json"
    report = gpu_check.main(["--dry-run", "--skip", "gpu_tests", "methods_embedded", "--out", str(out)])
    assert json.loads(out.read_text())["ok"] is report["ok"] is True, json.dumps(report["sections"], indent=1)[-3000:]
    assert set(report["sections"]) == {"build_llama_1b", "methods_llama_1b", "int4_kernel_parity", "decode", "vllm"}

    cases = report["sections"]["methods_llama_1b"]["cases"]
    available = {c for c, (_, _, _, needs) in gpu_check.CASES.items() if not gpu_check.missing_packages(needs)}
    assert {c for c, r in cases.items() if r["status"] == "ok"} == available
    for case in available:
        losses = cases[case]["losses"]
        assert len(losses) == 3 and all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], (case, losses)
        assert cases[case]["step_ms"] > 0 and cases[case]["trainable_params"] > 0
    if "peft_qlora" in available:
        assert cases["peft_qlora"]["step_time_x_peft"] == 1.0
        assert all("step_time_x_peft" in cases[c] for c in available)

    parity = report["sections"]["int4_kernel_parity"]
    assert len(parity["rows"]) == 9 and 0 < parity["max_relative_error"] < parity["tolerance"]
    decode = report["sections"]["decode"]
    assert decode["native_int4"]["tokens_per_s"] > 0 and decode["bf16"]["tokens_per_s"] > 0
    assert 0 <= decode["greedy_agreement_with_bf16"] <= 1


def test_a_missing_package_skips_its_case_by_name(tmp_path, monkeypatch):
    gpu_check = _gpu_check()
    monkeypatch.setitem(gpu_check.CASES, "needs_absent", ("NF4", {}, "LoRA", ["no_such_package_qblora"]))
    result = gpu_check.train_steps("needs_absent", "unused", None, 1, 1)
    assert result == {"status": "skipped", "reason": "no_such_package_qblora not installed (scripts/gpu_check.sh carries wheels)"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_without_cuda_and_without_dry_run_it_refuses(tmp_path):
    with pytest.raises(SystemExit, match="no CUDA device: run on a GPU machine, or pass --dry-run"):
        _gpu_check().main(["--out", str(tmp_path / "r.json")])


def test_shell_entry_point_runs_the_driver(tmp_path):
    skip = ["gpu_tests", "methods_embedded", "methods_llama_1b", "int4_kernel_parity", "decode"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": os.environ.get("PYTHON", "python")}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--dry-run", "--skip", *skip,
                           "--out", str(tmp_path / "r.json")], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["ok"] and report["sections"]["build_llama_1b"]["num_hidden_layers"] == 2


#: A stand-in for vLLM's offline API as scripts/vllm_logprobs.py uses it (LLM.generate with prompt
#: log-probs), computing with transformers' compressed-tensors load: it checks the section's plumbing
#: (export, prompts, JSON, comparison), not vLLM.
FAKE_VLLM = """
import types, torch
from qblora_pl.export.compressed_tensors_writer import load_compressed_tensors

class SamplingParams:
    def __init__(self, **kwargs):
        self.kwargs = kwargs

class LLM:
    def __init__(self, model, **kwargs):
        self.model = load_compressed_tensors(model)

    def generate(self, prompts, params):
        outputs = []
        for prompt in prompts:
            ids = prompt["prompt_token_ids"]
            with torch.no_grad():
                logprobs = torch.log_softmax(self.model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
            per_position = [None] + [{ids[t]: types.SimpleNamespace(logprob=float(logprobs[t - 1, ids[t]]))}
                                     for t in range(1, len(ids))]
            completion = types.SimpleNamespace(token_ids=[int(logprobs[-1].argmax())])
            outputs.append(types.SimpleNamespace(prompt_logprobs=per_position, outputs=[completion]))
        return outputs
"""


def test_the_vllm_section_compares_served_log_probs_with_ours(tmp_path, monkeypatch):
    pytest.importorskip("compressed_tensors")
    fake = tmp_path / "fake_vllm"
    (fake / "vllm").mkdir(parents=True)
    (fake / "vllm" / "__init__.py").write_text(FAKE_VLLM)
    python = tmp_path / "vllm_python"
    python.write_text(f"#!/bin/sh\nPYTHONPATH={fake}:{REPO} exec {os.sys.executable} \"$@\"\n")
    python.chmod(0o755)
    monkeypatch.setenv("VLLM_PYTHON", str(python))
    report = _gpu_check().main(["--dry-run", "--skip", "gpu_tests", "methods_embedded", "methods_llama_1b",
                                "int4_kernel_parity", "decode", "--out", str(tmp_path / "report.json")])
    section = report["sections"]["vllm"]
    assert section["status"] == "ok", json.dumps(section, indent=1)[-3000:]
    assert section["positions"] == 4 * 7 and section["greedy_agreement"] == 1.0
    assert section["max_abs_logprob_diff"] < 1e-4  # the export is the trained model (integer zero points)

