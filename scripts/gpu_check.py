"""One-call CUDA check: GPU tests, bf16 steps of every method, INT4 kernel parity, step cost vs PEFT, decode speed.

    bash scripts/gpu_check.sh --out gpu_check.json        # on a CUDA machine: at most ~8 minutes
    python scripts/gpu_check.py --dry-run --out /tmp/gpu_check.json   # CPU: the same code paths, tiny sizes (< 2 min)

Writes one JSON report. Each section records ``status`` (``ok`` / ``failed`` / ``skipped``), its
seconds and its numbers; a failing section does not stop the others, and a section that would
start after ``--budget-s`` is skipped (named in the report), so the whole check ends in time.

Sections:

* ``environment`` - torch / CUDA / device and the versions of the packages the cases need.
* ``gpu_tests`` - ``pytest -m gpu`` over ``tests/quantization`` (on CPU they are collected and skipped).
* ``methods_embedded`` / ``methods_llama_1b`` - a few bf16-autocast training steps of QLoRA and
  Q-BLoRA on NF4 (bitsandbytes and torchao), QA-LoRA and QA-BLoRA on INT4 g32, and HF PEFT's QLoRA,
  on the embedded model and on a Llama of about 1B parameters (TinyLlama's shape with the embedded
  tokenizer's 4,096-token vocabulary: 22 layers, hidden 2048, MLP 5632, 32 heads, 4 KV heads; 0.97B
  parameters) built here with random weights - no checkpoint travels. Per case: the losses
  (finite, and they must fall), median step time, peak CUDA memory (``max_memory_allocated`` after
  loading; on CPU the growth of the process's peak RSS), and each case's ratios to PEFT's QLoRA.
* ``int4_kernel_parity`` - ``GroupwiseIntLinear`` with torch's INT4 kernel vs the exact dequantize
  path on the device, for group sizes 32 / 64 / 128 at the 1B model's shapes: max relative error.
* ``vllm`` - vLLM (its own environment: ``VLLM_PYTHON``; skipped where vllm does not import) serves the
  compressed-tensors INT4 g128 export of the 1B model (QA-BLoRA with integer zero points): its prompt
  log-probs and greedy tokens against ours, within ``--vllm-tolerance`` nats (float16 kernels).
* ``decode`` - greedy decode tokens/s, batch 1, of the native INT4 export of the 1B model
  (QA-BLoRA merged into its offsets, loaded with ``load_native(fast_int4=True)``) against the same
  model dense in bf16, plus their greedy agreement.

Packages the GPU image lacks (bitsandbytes, torchao) travel as wheels: scripts/gpu_check.sh.
A case whose package is missing is reported ``skipped`` with the package's name.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: TinyLlama-1.1B's shape; with the embedded tokenizer's 4,096 tokens it has 0.97B parameters.
LLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, max_position_embeddings=2048)
#: The dry run's stand-in: the same code, a 2-layer model.
LLAMA_TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256)

# case -> (backend, backend kwargs, adapter, packages it needs)
CASES = {
    "qlora_bnb": ("NF4", {}, "LoRA", ["bitsandbytes"]),
    "qblora_bnb": ("NF4", {}, "QBLoRA", ["bitsandbytes"]),
    "qlora_torchao": ("NF4", {"implementation": "torchao"}, "LoRA", ["torchao"]),
    "qblora_torchao": ("NF4", {"implementation": "torchao"}, "QBLoRA", ["torchao"]),
    "qalora": ("GroupwiseInt", {"bits": 4, "group_size": 32}, "QALoRA", []),
    "qablora": ("GroupwiseInt", {"bits": 4, "group_size": 32}, "QABLoRA", []),
    "peft_qlora": ("peft", {}, "LoRA", ["bitsandbytes", "peft"]),
}


def missing_packages(names: list[str]) -> list[str]:
    return [n for n in names if importlib.util.find_spec(n) is None]


# ------------------------------------------------------------------------------ sections
def environment() -> dict:
    import torch

    versions = {}
    for name in ("transformers", "lightning", "bitsandbytes", "torchao", "peft", "safetensors"):
        try:
            versions[name] = __import__(name).__version__ if importlib.util.find_spec(name) else None
        except Exception as error:  # noqa: BLE001 - an installed package that fails to import
            versions[name] = f"import failed: {error}"
    cuda = torch.cuda.is_available()
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "bf16": bool(cuda and torch.cuda.is_bf16_supported()),
        "versions": versions,
    }


def gpu_tests(args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-rs", "tests/quantization"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.tests_timeout_s)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    summary = lines[-1] if lines else proc.stderr[-500:]
    # pytest's exit code 5: nothing selected; on CPU every gpu test is skipped, which is a pass here.
    if proc.returncode not in (0, 5):
        raise RuntimeError(f"pytest -m gpu failed (rc {proc.returncode}): {summary}\n{proc.stdout[-3000:]}")
    return {"command": " ".join(cmd[1:]), "summary": summary, "returncode": proc.returncode}


def build_random_llama(directory: Path, shape: dict, device: str) -> dict:
    """A Llama of ``shape`` with random weights and the embedded tokenizer, saved in bf16 (fp32 on CPU)."""
    import shutil

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from qblora_pl.paths import EMBEDDED_MODEL_DIR

    tokenizer = AutoTokenizer.from_pretrained(EMBEDDED_MODEL_DIR)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False, **shape)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(directory)
    for path in EMBEDDED_MODEL_DIR.iterdir():
        if "token" in path.name or path.name == "special_tokens_map.json":
            shutil.copy(path, directory / path.name)
    params = sum(p.numel() for p in model.parameters())
    del model
    return {"parameters": params, "dtype": str(dtype).removeprefix("torch."), **shape}


def _peak_reset(device) -> int:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _peak(device, baseline: int) -> int:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline


def load_case(case: str, model_dir: str, rank: int):
    """The model of one case, adapters injected, in train mode."""
    import torch

    backend_name, backend_kwargs, adapter_name, _ = CASES[case]
    if backend_name == "peft":
        sys.path.insert(0, str(ROOT / "bench"))
        from step_cost import build_peft_model

        return build_peft_model(argparse.Namespace(model=model_dir, rank=rank, peft_kbit_prep=False))
    from qblora_pl import adapters, quantization
    from qblora_pl.module import QuantizedCausalLM

    backend = getattr(quantization, backend_name)(**backend_kwargs)
    adapter_kwargs = {"budget_rank": rank} if adapter_name == "QABLoRA" else {"r": rank}
    torch.manual_seed(0)
    module = QuantizedCausalLM(model_name_or_path=model_dir, quantization=backend,
                               adapter=getattr(adapters, adapter_name)(dropout=0.0, **adapter_kwargs))
    module.configure_model()
    return module.model


def train_steps(case: str, model_dir: str, args: argparse.Namespace, batch_size: int, seq_len: int) -> dict:
    """``warmup + steps`` bf16-autocast AdamW steps on one fixed random batch (it must be learnt)."""
    import torch

    missing = missing_packages(CASES[case][3])
    if missing:
        return {"status": "skipped", "reason": f"{', '.join(missing)} not installed (scripts/gpu_check.sh carries wheels)"}
    model = load_case(case, model_dir, args.rank)
    device = next(p for p in model.parameters() if p.requires_grad).device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (batch_size, seq_len), generator=generator).to(device)
    model.train()
    baseline = _peak_reset(device)
    losses, times = [], []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        losses.append(float(loss))
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    peak = _peak(device, baseline)
    result = {
        "status": "ok",
        "losses": losses,
        "step_ms": 1000 * statistics.median(times),
        "tokens_per_s": batch_size * seq_len / statistics.median(times),
        "peak_memory_bytes": peak,
        # On CPU (the dry run) every case runs in one process, whose peak RSS only grows: not per case.
        "memory_kind": "cuda_max_allocated" if device.type == "cuda" else "cpu_peak_rss_growth_not_per_case",
        "trainable_params": sum(p.numel() for p in params),
        "device": str(device),
    }
    del model, optimizer, params
    _free()
    if not all(math.isfinite(v) for v in losses):
        result.update(status="failed", reason=f"non-finite loss {losses}")
    elif losses[-1] >= losses[0]:
        result.update(status="failed", reason=f"the loss did not fall on a repeated batch: {losses[0]:.4f} -> {losses[-1]:.4f}")
    return result


def _free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def methods(model_dir: str, args: argparse.Namespace, batch_size: int, seq_len: int, deadline: float) -> dict:
    out: dict = {"batch": [batch_size, seq_len], "cases": {}}
    for case in args.cases:
        if time.perf_counter() > deadline:
            out["cases"][case] = {"status": "skipped", "reason": "time budget spent"}
            continue
        try:
            out["cases"][case] = train_steps(case, model_dir, args, batch_size, seq_len)
        except Exception as error:  # noqa: BLE001 - one case failing must not hide the others
            out["cases"][case] = {"status": "failed", "reason": f"{type(error).__name__}: {error}",
                                  "traceback": traceback.format_exc()[-2000:]}
            _free()
    peft = out["cases"].get("peft_qlora", {})
    for case, result in out["cases"].items():
        if result.get("status") == "ok" and peft.get("status") == "ok":
            result["step_time_x_peft"] = result["step_ms"] / peft["step_ms"]
            result["peak_memory_x_peft"] = result["peak_memory_bytes"] / max(peft["peak_memory_bytes"], 1)
    bad = [c for c, r in out["cases"].items() if r["status"] == "failed"]
    if bad:
        out["failed_cases"] = bad
    return out


def int4_kernel_parity(shape: dict, device: str) -> dict:
    """Torch's INT4 kernel against the exact dequantize path, on the device, at the model's shapes."""
    import torch
    from torch import nn

    from qblora_pl.quantization import GroupwiseIntLinear

    d, m = shape["hidden_size"], shape["intermediate_size"]
    rows = []
    for group_size in (32, 64, 128):
        for d_out, d_in in ((d, d), (m, d), (d, m)):
            torch.manual_seed(0)
            linear = nn.Linear(d_in, d_out, bias=False, device=device)
            layer = GroupwiseIntLinear.from_linear(linear, bits=4, group_size=group_size).to(device)
            x = torch.randn(4, d_in, device=device)
            with torch.no_grad():
                exact = layer(x)
                layer.use_int4_kernel(True)
                fast = layer(x)
                layer.use_int4_kernel(False)
            error = float((fast.float() - exact).norm() / exact.norm())
            rows.append({"group_size": group_size, "shape": [d_out, d_in], "relative_error": error})
    worst = max(r["relative_error"] for r in rows)
    result = {"rows": rows, "max_relative_error": worst, "tolerance": 1e-2}
    if not worst < 1e-2:
        raise AssertionError(f"INT4 kernel relative error {worst:.3g} >= 1e-2: {rows}")
    return result


def decode(model_dir: str, args: argparse.Namespace, export_root: Path) -> dict:
    """Greedy decode tokens/s: the native INT4 export (INT4 kernel) vs the dense model in bf16."""
    import torch

    from qblora_pl.adapters import QABLoRA
    from qblora_pl.adapters.injection import adapted_layers
    from qblora_pl.export import export_module, load_native
    from qblora_pl.module import QuantizedCausalLM
    from qblora_pl.quantization import GroupwiseInt, NoQuantization

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    module = QuantizedCausalLM(model_dir, quantization=GroupwiseInt(bits=4, group_size=32), adapter=QABLoRA(budget_rank=8, dropout=0.0))
    module.configure_model()
    torch.manual_seed(2)
    with torch.no_grad():  # a non-zero adapter, so the export merges something
        for layer in adapted_layers(module.model).values():
            for p in layer.adapter.parameters():
                p.normal_(0, 0.01)
    export_module(module, export_root, formats=["native"], verify=False, log=lambda _: None)
    del module
    _free()
    models = {
        "native_int4": load_native(export_root / "native", device=device, fast_int4=True),
        "bf16": NoQuantization(compute_dtype="bfloat16").load(model_dir).to(device).eval(),
    }
    prompt = torch.arange(3, 3 + args.prompt_len, device=device).unsqueeze(0)
    result: dict = {"new_tokens": args.new_tokens, "prompt_tokens": args.prompt_len, "batch": 1}
    outputs = {}
    for name, model in models.items():
        with torch.inference_mode():
            model.generate(prompt, max_new_tokens=2, min_new_tokens=2, do_sample=False)  # warm-up
            times = []
            for _ in range(args.decode_repeats):
                if cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                out = model.generate(prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
                if cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
        outputs[name] = out[0, prompt.shape[1]:].tolist()
        result[name] = {"tokens_per_s": args.new_tokens / min(times), "seconds": min(times)}
    result["native_int4_x_bf16"] = result["native_int4"]["tokens_per_s"] / result["bf16"]["tokens_per_s"]
    same = sum(a == b for a, b in zip(outputs["native_int4"], outputs["bf16"]))
    result["greedy_agreement_with_bf16"] = same / args.new_tokens
    return result


def vllm_serving(model_dir: str, args: argparse.Namespace, export_root: Path) -> dict:
    """vLLM on the compressed-tensors INT4 g128 export vs our model: prompt log-probs and greedy tokens.

    QA-BLoRA trains (here: random adapters) with integer zero points (``QATSchedule(zero_point:
    integer)``), so the export is the trained model exactly; vLLM's Marlin / Machete kernels then compute
    in float16 and are not bit-exact, so the check is a tolerance (``--vllm-tolerance`` nats). vLLM runs
    in its own environment (``VLLM_PYTHON``, default this Python): skipped where it does not import.
    """
    import os

    python = os.environ.get("VLLM_PYTHON", sys.executable)
    probe = subprocess.run([python, "-c", "import vllm"], capture_output=True, text=True)
    if probe.returncode != 0:
        return {"status_reason": "skipped", "skipped": f"vllm does not import in {python} (pip install vllm in its own "
                f"venv, then VLLM_PYTHON=that/python): {probe.stderr.strip().splitlines()[-1:]}"}
    import torch

    from qblora_pl.adapters import QABLoRA
    from qblora_pl.adapters.injection import adapted_layers
    from qblora_pl.export import export_module
    from qblora_pl.module import QuantizedCausalLM
    from qblora_pl.qat import MergedOffsetFakeQuant
    from qblora_pl.quantization import GroupwiseInt

    module = QuantizedCausalLM(model_dir, quantization=GroupwiseInt(bits=4, group_size=128),
                               adapter=QABLoRA(budget_rank=8, dropout=0.0))
    module.configure_model()
    torch.manual_seed(3)
    with torch.no_grad():
        for layer in adapted_layers(module.model).values():
            for p in layer.adapter.parameters():
                p.normal_(0, 0.01)
            layer.fake_quant = MergedOffsetFakeQuant()  # integer zero points at full strength, as trained
    generator = torch.Generator().manual_seed(4)
    vocab = module.model.config.vocab_size
    prompts = [torch.randint(3, vocab, (args.prompt_len,), generator=generator).tolist() for _ in range(4)]
    ours = []
    module.model.eval()
    with torch.no_grad():
        for ids in prompts:
            logits = module.model(input_ids=torch.tensor([ids])).logits[0].float()
            logprobs = torch.log_softmax(logits, dim=-1)
            ours.append({"prompt_logprobs": [float(logprobs[t - 1, ids[t]]) for t in range(1, len(ids))],
                         "greedy_next": int(logits[-1].argmax())})
    export_module(module, export_root, formats=["compressed-tensors"], verify=False, log=lambda _: None)
    del module
    _free()
    prompts_file, out_file = export_root / "prompts.json", export_root / "vllm.json"
    prompts_file.write_text(json.dumps(prompts))
    cmd = [python, str(ROOT / "scripts" / "vllm_logprobs.py"), "--model", str(export_root / "compressed-tensors"),
           "--prompts", str(prompts_file), "--out", str(out_file)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.vllm_timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"vLLM failed (rc {proc.returncode}): {proc.stderr[-3000:]}")
    theirs = json.loads(out_file.read_text())["results"]
    diffs = [abs(a - b) for o, t in zip(ours, theirs) for a, b in zip(o["prompt_logprobs"], t["prompt_logprobs"])]
    greedy = sum(o["greedy_next"] == t["greedy_next"] for o, t in zip(ours, theirs)) / len(ours)
    result = {"bits": 4, "group_size": 128, "prompts": len(prompts), "positions": len(diffs),
              "max_abs_logprob_diff": max(diffs), "mean_abs_logprob_diff": sum(diffs) / len(diffs),
              "greedy_agreement": greedy, "tolerance_nats": args.vllm_tolerance}
    if result["max_abs_logprob_diff"] > args.vllm_tolerance:
        result["failed_cases"] = [f"max |log-prob diff| {result['max_abs_logprob_diff']:.3g} > {args.vllm_tolerance}"]
    return result


# ------------------------------------------------------------------------------ driver
def run_section(report: dict, name: str, deadline: float, fn, *fn_args) -> None:
    """Run one section into ``report`` and rewrite the JSON file, so a killed run still leaves one."""
    start = time.perf_counter()
    if start > deadline:
        report["sections"][name] = {"status": "skipped", "reason": "time budget spent"}
        return
    try:
        result = fn(*fn_args)
        status = "failed" if isinstance(result, dict) and result.get("failed_cases") else "ok"
        if isinstance(result, dict) and result.pop("status_reason", None) == "skipped":
            status = "skipped"
        report["sections"][name] = {"status": status, **result}
    except Exception as error:  # noqa: BLE001 - the report says what failed; the other sections still run
        report["sections"][name] = {"status": "failed", "reason": f"{type(error).__name__}: {error}",
                                    "traceback": traceback.format_exc()[-3000:]}
    report["sections"][name]["seconds"] = round(time.perf_counter() - start, 1)
    print(f"[gpu_check] {name}: {report['sections'][name]['status']} ({report['sections'][name]['seconds']} s)", flush=True)
    Path(report["out"]).write_text(json.dumps(report, indent=2))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--dry-run", action="store_true", help="CPU allowed, tiny sizes: checks the code paths, not the GPU")
    parser.add_argument("--budget-s", type=float, default=420.0, help="no section starts after this many seconds")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--skip", nargs="*", default=[], help="sections not to run (e.g. gpu_tests)")
    parser.add_argument("--vllm-tolerance", type=float, default=0.1,
                        help="vllm section: max |log-prob difference| (nats) of vLLM's float16 kernels from our model")
    parser.add_argument("--vllm-timeout-s", type=float, default=300.0)
    args = parser.parse_args(argv)

    import torch

    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU machine, or pass --dry-run to check the code paths on CPU")
    if args.dry_run:
        args.steps, args.warmup, args.tests_timeout_s = 2, 1, 120
        big_shape, big_batch, embedded_batch = LLAMA_TINY, (2, 32), (2, 32)
        args.new_tokens, args.prompt_len, args.decode_repeats = 4, 8, 1
    else:
        args.steps, args.warmup, args.tests_timeout_s = 5, 2, 150
        big_shape, big_batch, embedded_batch = LLAMA_1B, (4, 512), (8, 256)
        args.new_tokens, args.prompt_len, args.decode_repeats = 64, 32, 2

    from qblora_pl.paths import EMBEDDED_MODEL_DIR

    started = time.perf_counter()
    deadline = started + args.budget_s
    report: dict = {"dry_run": args.dry_run, "budget_s": args.budget_s, "out": str(args.out), "environment": environment(),
                    "sections": {}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        big_dir = Path(tmp) / "llama_1b"
        if "gpu_tests" not in args.skip:
            run_section(report, "gpu_tests", deadline, gpu_tests, args)
        if "methods_embedded" not in args.skip:
            run_section(report, "methods_embedded", deadline, methods, str(EMBEDDED_MODEL_DIR), args, *embedded_batch, deadline)
        run_section(report, "build_llama_1b", deadline, build_random_llama, big_dir, big_shape, device)
        built = report["sections"]["build_llama_1b"]["status"] == "ok"
        if "methods_llama_1b" not in args.skip and built:
            run_section(report, "methods_llama_1b", deadline, methods, str(big_dir), args, *big_batch, deadline)
        if "int4_kernel_parity" not in args.skip:
            run_section(report, "int4_kernel_parity", deadline, int4_kernel_parity, big_shape, device)
        if "decode" not in args.skip and built:
            run_section(report, "decode", deadline, decode, str(big_dir), args, Path(tmp) / "export")
        if "vllm" not in args.skip and built:
            run_section(report, "vllm", deadline, vllm_serving, str(big_dir), args, Path(tmp) / "export_vllm")
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["ok"] = all(s["status"] in ("ok", "skipped") for s in report["sections"].values())
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"[gpu_check] wrote {args.out} in {report['seconds']} s: {'ok' if report['ok'] else 'FAILED'}")
    return report


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
