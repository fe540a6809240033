"""The pipeline users run today, as a baseline: a merged fine-tuned model quantized by llm-compressor's GPTQ.

:func:`library_gptq_model` takes a model whose adapters are merged into dense weights (QLoRA /
Q-BLoRA after :func:`qblora_pl.merging.merge_adapters`), writes it as a float32 Hugging Face folder,
runs ``scripts/library_gptq.py`` under llm-compressor's own virtual environment
(``bash scripts/setup_library_gptq_venv.sh``; it pins transformers and compressed-tensors versions
that conflict with ours) on the given calibration tokens, and loads the result - the library's GPTQ
weights, dequantized exactly - as a dense float32 model to score. The calibration tokens are the
run's own (:meth:`InstructionDataModule.calibration_set`), the same ones ``GroupwiseInt(init='gptq')``
uses, so the two GPTQs differ only in the library.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
VENV_PYTHON = ROOT / ".venvs" / "llmcompressor" / "bin" / "python"


def check_library_venv() -> None:
    """Raise naming the setup command when llm-compressor's environment is missing."""
    if not VENV_PYTHON.is_file():
        raise SystemExit(f"llm-compressor's environment {VENV_PYTHON.parent.parent} is missing: run "
                         "`bash scripts/setup_library_gptq_venv.sh` first (it pins its own transformers)")


def library_gptq_model(model, merge_how: dict[str, str], tokenizer_source: str, calibration, bits: int,
                       group_size: int, threads: int | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The merged ``model`` GPTQ-quantized by llm-compressor (INT-``bits``, group ``group_size``, asymmetric,
    no activation ordering), dequantized into a float32 model; and the library run's record."""
    from transformers import AutoModelForCausalLM

    from qblora_pl.export.hf_dense import write_hf_dense
    from qblora_pl.export.snapshot import snapshot_merged_model

    check_library_venv()
    with tempfile.TemporaryDirectory(prefix="library_gptq_") as work:
        work = Path(work)
        write_hf_dense(snapshot_merged_model(model, merge_how), work / "merged", tokenizer_source,
                       dense_dtype=torch.float32)
        (work / "calibration.json").write_text(json.dumps({"sequences": [s.tolist() for s in calibration.sequences]}))
        command = [str(VENV_PYTHON), str(ROOT / "scripts" / "library_gptq.py"), "--model", str(work / "merged"),
                   "--calibration", str(work / "calibration.json"), "--bits", str(bits), "--group-size",
                   str(group_size), "--output", str(work / "out")]
        if threads is not None:
            command += ["--threads", str(threads)]
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
        if done.returncode != 0:
            print(done.stderr[-4000:], file=sys.stderr)
            raise RuntimeError(f"library GPTQ failed (exit {done.returncode}): {' '.join(command)}")
        record = json.loads((work / "out" / "library_gptq.json").read_text())
        quantized = AutoModelForCausalLM.from_pretrained(work / "out" / "dequantized", dtype=torch.float32)
    device = next(model.parameters()).device
    record["calibration"] = calibration.describe()
    return quantized.to(device).eval(), record
