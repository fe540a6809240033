"""The exported low-bit model: perplexity before / after the merge, and decode speed.

    OMP_NUM_THREADS=1 python bench/lowbit_model.py                 # train QA-BLoRA 100 steps, then measure
    python bench/lowbit_model.py --ckpt runs/qablora/version_0/checkpoints/last.ckpt

1. A QA-BLoRA adapter on the INT4 g32 base of the embedded model is trained for ``--steps``
   (Lightning, the settings of ``configs/qablora.yaml`` without QAT), or loaded from ``--ckpt``.
2. It is merged and exported (``qblora_pl.export.export_module``): the native INT4 model, the
   GGUF Q4_1 file and the merged 16-bit HF directory. An F16 GGUF of the same merged model is
   written from the 16-bit HF export (every linear layer F16), so llama.cpp can be compared
   with itself. Both GGUF files store embeddings / output head in F16 (``gguf_dense_type=f16``),
   so the transformer linears are the only difference; the file the default export writes
   (embeddings and head: the source's type if exact, else Q8_0 if lossless, else F16) is timed too (``gguf_q4_1_default``).
3. Perplexity on the embedded validation split (every record; response tokens as in training,
   and all non-pad tokens) of: the INT4 base before training, the trained adapter model
   (unmerged), the merged model in memory, the native export (``load_native``; and with
   ``fast_int4=True``, ``native_int4_kernel``), the 16-bit HF
   export (float32 compute), and both GGUF files through llama.cpp (llama-cpp-python).
4. Greedy decode speed, batch 1, a fixed prompt plus ``--new-tokens`` tokens (EOS does not stop
   it; prefill included), ``--repeats`` interleaved rounds over all backends, best and median
   round reported (wall clock; and tokens per process CPU-second, less sensitive to other
   processes on a shared machine): the 16-bit HF model in torch (fp16 and bf16 weights and compute) and upcast to
   fp32, our native INT4 model in torch (exact dequantize path, and ``load_native(fast_int4=True)``: torch's
   INT4 kernel, bf16 compute, row ``torch_native_int4_kernel``), llama.cpp on F16 and on Q4_1 (its plain CPU
   kernels; ``--llama-cpp-extra-buffers`` lets it repack weights for AMX / AVX, which segfaults on some AMX CPUs). Each generated sequence
   is compared with the fp32 torch one (greedy agreement).

Use one thread per process (``--threads``, default 1) for comparable figures on a shared CPU.
Prints tables, writes JSON to ``--out`` and a PNG next to it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qblora_pl.export.verify import open_llama_cpp  # noqa: E402

INT4_G32 = {"bits": 4, "group_size": 32}  # configs/qablora.yaml's base and adapter at this width

PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nGive the word that is defined as follows.\n\n### Response:\n"
)


# ------------------------------------------------------------------------------ perplexity


def _nll_rows(logits: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor):
    """Per-position next-token NLL; returns (sum over response tokens, count, sum over all tokens, count)."""
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1), reduction="none"
    ).view(input_ids.shape[0], -1)
    response = labels[:, 1:] != -100
    every = mask[:, 1:].bool()
    return float(nll[response].sum()), int(response.sum()), float(nll[every].sum()), int(every.sum())


def _ppl(totals) -> dict:
    r_sum, r_n, a_sum, a_n = totals
    return {
        "ppl_response": math.exp(r_sum / max(r_n, 1)),
        "loss_response": r_sum / max(r_n, 1),
        "ppl_all_tokens": math.exp(a_sum / max(a_n, 1)),
        "response_tokens": r_n,
        "all_tokens": a_n,
    }


@torch.no_grad()
def torch_perplexity(model, batches) -> dict:
    model.eval()
    totals = [0.0, 0, 0.0, 0]
    for b in batches:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        for i, v in enumerate(_nll_rows(logits, b["input_ids"], b["labels"], b["attention_mask"])):
            totals[i] += v
    return _ppl(totals)


def llama_cpp_perplexity(gguf_path: Path, batches, threads: int, extra_buffer_types: bool = False) -> dict:
    import numpy as np

    longest = max(int(b["attention_mask"].sum(1).max()) for b in batches)
    llm = open_llama_cpp(
        gguf_path, extra_buffer_types=extra_buffer_types, n_ctx=max(64, longest), n_batch=max(64, longest), logits_all=True,
        n_threads=threads, n_threads_batch=threads, verbose=False,
    )
    totals = [0.0, 0, 0.0, 0]
    try:
        for b in batches:
            for row in range(b["input_ids"].shape[0]):
                n = int(b["attention_mask"][row].sum())
                ids = b["input_ids"][row, :n]
                llm.reset()
                llm.eval(ids.tolist())
                logits = torch.from_numpy(np.array(llm.scores[:n], dtype=np.float32, copy=True))[None]
                for i, v in enumerate(
                    _nll_rows(logits, ids[None], b["labels"][row, :n][None], b["attention_mask"][row, :n][None])
                ):
                    totals[i] += v
    finally:
        llm.close()
    return _ppl(totals)


# ------------------------------------------------------------------------------ decode


class TorchDecoder:
    def __init__(self, model, prompt_ids: list[int], new_tokens: int) -> None:
        self.model = model.eval()
        self.model.generation_config.eos_token_id = None  # run exactly new_tokens steps, as llama.cpp
        self.model.generation_config.pad_token_id = 0
        self.ids = torch.tensor([prompt_ids])
        self.new_tokens = new_tokens

    @torch.inference_mode()
    def __call__(self) -> list[int]:
        out = self.model.generate(
            self.ids, attention_mask=torch.ones_like(self.ids), max_new_tokens=self.new_tokens,
            min_new_tokens=self.new_tokens, do_sample=False, use_cache=True,
        )
        return out[0, self.ids.shape[1]:].tolist()


class LlamaCppDecoder:
    def __init__(
        self, gguf_path: Path, prompt_ids: list[int], new_tokens: int, threads: int, extra_buffer_types: bool = False
    ) -> None:
        self.llm = open_llama_cpp(
            gguf_path, extra_buffer_types=extra_buffer_types, n_ctx=len(prompt_ids) + new_tokens + 8, n_threads=threads,
            n_threads_batch=threads, verbose=False,
        )
        self.prompt_ids, self.new_tokens = prompt_ids, new_tokens

    def __call__(self) -> list[int]:
        self.llm.reset()  # no prefix reuse across rounds: every round pays its prefill
        out = []
        for token in self.llm.generate(self.prompt_ids, top_k=1, temp=0.0, reset=True):
            out.append(int(token))
            if len(out) == self.new_tokens:
                break
        return out

    def close(self) -> None:
        self.llm.close()


# ------------------------------------------------------------------------------ main


def train_or_load(args):
    import lightning.pytorch as pl

    from bench.accuracy_lib.methods import from_config
    from qblora_pl.data.datamodule import InstructionDataModule
    from qblora_pl.module import QuantizedCausalLM

    data = InstructionDataModule(
        args.data, tokenizer_name_or_path=args.model, batch_size=8, eval_batch_size=args.eval_batch_size,
        max_source_length=256, max_target_length=64,
    )
    data.setup("fit")
    val_batches = list(data.val_dataloader())
    if args.val_records:
        kept, n = [], 0
        for b in val_batches:
            if n >= args.val_records:
                break
            take = min(args.val_records - n, b["input_ids"].shape[0])
            kept.append({k: v[:take] for k, v in b.items()})
            n += take
        val_batches = kept

    if args.ckpt:
        from qblora_pl.export.exporter import module_from_checkpoint

        checkpoint = torch.load(args.ckpt, map_location="cpu", weights_only=True)
        module = module_from_checkpoint(checkpoint)
        module.configure_model()
        base = torch_perplexity(module.model, val_batches)  # loaded below: base = before the adapter weights
        result = module.load_state_dict(checkpoint["state_dict"], strict=False)
        if result.unexpected_keys:
            raise SystemExit(f"{args.ckpt}: unexpected keys {result.unexpected_keys[:5]}")
        return module, val_batches, base, {"ckpt": args.ckpt}

    pl.seed_everything(args.seed)
    quantization, adapter = from_config("qablora", quantization=INT4_G32, adapter={"budget_rank": args.rank})
    module = QuantizedCausalLM(
        args.model, quantization=quantization, adapter=adapter, learning_rate=args.lr, warmup_steps=10,
    )
    module.configure_model()
    base = torch_perplexity(module.model, val_batches)  # QA-BLoRA starts at a zero update: the INT4 base
    module.model.train()
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=args.steps, logger=False, enable_checkpointing=False,
        limit_val_batches=0, enable_model_summary=False, gradient_clip_val=0.3, enable_progress_bar=False,
    )
    started = time.perf_counter()
    trainer.fit(module, datamodule=data)
    return module, val_batches, base, {"steps": args.steps, "lr": args.lr, "train_seconds": time.perf_counter() - started}


def synthetic_module(args):
    """A randomly initialised Llama of the shape ``--synthetic`` (speed only: its perplexity is
    meaningless), on the INT4 g32 base, with a random (non-zero) QA-BLoRA update to merge."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    from bench.accuracy_lib.methods import from_config
    from qblora_pl.module import QuantizedCausalLM

    hidden, intermediate, layers, heads = (int(v) for v in args.synthetic.split(","))
    source = Path(args.model)
    directory = Path(args.export_dir) / "synthetic-base"
    base_config = json.loads((source / "config.json").read_text())
    config = LlamaConfig(
        vocab_size=base_config["vocab_size"], hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=base_config["max_position_embeddings"], rms_norm_eps=base_config["rms_norm_eps"],
        bos_token_id=base_config["bos_token_id"], eos_token_id=base_config["eos_token_id"], tie_word_embeddings=False,
    )
    torch.manual_seed(args.seed)
    LlamaForCausalLM(config).save_pretrained(directory)
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        if (source / name).is_file():
            shutil.copy(source / name, directory / name)
    quantization, adapter = from_config("qablora", quantization=INT4_G32, adapter={"budget_rank": args.rank, "dropout": 0.0})
    module = QuantizedCausalLM(str(directory), quantization=quantization, adapter=adapter)
    module.configure_model()
    with torch.no_grad():
        for name, p in module.model.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    return module, {"synthetic": args.synthetic, "hidden": hidden, "intermediate": intermediate, "layers": layers,
                    "heads": heads, "base_dir": str(directory)}


def write_f16_gguf(hf_dir: Path, path: Path, tokenizer_source: str) -> dict:
    """An F16 GGUF of the merged model, from the 16-bit HF export (every 2-D tensor F16)."""
    from transformers import AutoModelForCausalLM

    from qblora_pl.export.gguf_writer import write_gguf
    from qblora_pl.export.snapshot import snapshot_merged_model

    dense = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float16)
    info = write_gguf(snapshot_merged_model(dense), path, tokenizer_source, dense_type="f16", name="merged-f16")
    return {k: info[k] for k in ("path", "bytes", "layer_types")}


def main() -> None:
    from qblora_pl.paths import EMBEDDED_DATA_DIR, EMBEDDED_MODEL_DIR

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(EMBEDDED_MODEL_DIR))
    parser.add_argument("--data", default=str(EMBEDDED_DATA_DIR / "instructions"))
    parser.add_argument("--ckpt", default=None, help="adapter checkpoint of a QA-* run (skips training)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--rank", type=int, default=8, help="QA-BLoRA budget rank")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-batch-size", type=int, default=16)
    parser.add_argument("--val-records", type=int, default=0, help="evaluate the first N validation records (0: all)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved decode rounds over all backends")
    parser.add_argument("--threads", type=int, default=1, help="torch and llama.cpp threads")
    parser.add_argument("--synthetic", default=None, metavar="HIDDEN,INTERMEDIATE,LAYERS,HEADS",
                        help="speed only: a random Llama of this shape instead of training (no perplexity)")
    parser.add_argument(
        "--llama-cpp-extra-buffers", action="store_true",
        help="let llama.cpp repack weights into its AMX / CPU_REPACK buffers (faster; segfaults on some AMX CPUs)",
    )
    parser.add_argument("--skip-torch-16bit", action="store_true", help="do not time torch fp16 / bf16 decode")
    parser.add_argument("--export-dir", default="build/bench_lowbit")
    parser.add_argument("--out", default="bench/results/lowbit_model.json")
    args = parser.parse_args()
    if args.model:  # a .gguf file: its converted HF directory (qblora_pl.sources)
        from qblora_pl.sources import pretrained_name_or_path

        args.model = pretrained_name_or_path(args.model)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)

    try:
        import llama_cpp  # noqa: F401

        have_llama_cpp = True
    except ImportError:
        have_llama_cpp = False
        print("llama-cpp-python is not installed: the GGUF rows are skipped", file=sys.stderr)

    from qblora_pl.adapters.injection import count_parameters
    from qblora_pl.export import export_module, load_native
    from qblora_pl.export.verify import load_hf_dense
    from qblora_pl.merging import merge_adapters, unmerge_adapters

    export_dir = Path(args.export_dir)
    ppl: dict[str, dict] = {}
    if args.synthetic:
        module, run = synthetic_module(args)
        model = module.model
        args.model = run["base_dir"]
        report = export_module(module, export_dir / "export", formats=["native", "gguf", "hf"], gguf_dense_type="f16",
                               verify=False, overwrite=True, log=lambda _: None)
    else:
        module, val_batches, base_ppl, run = train_or_load(args)
        model = module.model
        ppl["int4_base_untrained"] = base_ppl
        ppl["adapter_unmerged"] = torch_perplexity(model, val_batches)
        merge_adapters(model)
        ppl["merged_in_memory"] = torch_perplexity(model, val_batches)
        unmerge_adapters(model)
        first = val_batches[0]
        report = export_module(
            module, export_dir / "export", formats=["native", "gguf", "hf"], gguf_dense_type="f16",
            batch={k: v[:8] for k, v in first.items()}, batch_source="val split", overwrite=True, log=lambda _: None,
        )
    run["params"] = count_parameters(model)[1]  # logical count: packed INT4 weights by their size
    export_module(module, export_dir / "export_default", formats=["gguf"], verify=False, overwrite=True, log=lambda _: None)
    q4_path, q4_default_path = export_dir / "export" / "model.gguf", export_dir / "export_default" / "model.gguf"
    hf_dir, native_dir = export_dir / "export" / "hf", export_dir / "export" / "native"
    f16_gguf = write_f16_gguf(hf_dir, export_dir / "merged-f16.gguf", args.model)
    f16_path = Path(f16_gguf["path"])
    del model, module

    native = load_native(native_dir)
    native_kernel = load_native(native_dir, fast_int4=True)  # torch's INT4 kernel, bf16 compute
    dense32 = load_hf_dense(hf_dir)
    if not args.synthetic:
        ppl["native_int4"] = torch_perplexity(native, val_batches)
        ppl["native_int4_kernel"] = torch_perplexity(native_kernel, val_batches)
        ppl["hf_16bit_export_fp32_compute"] = torch_perplexity(dense32, val_batches)
    if have_llama_cpp and not args.synthetic:
        ppl["llama_cpp_gguf_q4_1"] = llama_cpp_perplexity(q4_path, val_batches, args.threads, args.llama_cpp_extra_buffers)
        ppl["llama_cpp_gguf_f16"] = llama_cpp_perplexity(f16_path, val_batches, args.threads, args.llama_cpp_extra_buffers)

    # ---- decode
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    decoders = {"torch_hf_fp32": TorchDecoder(dense32, prompt_ids, args.new_tokens)}
    if not args.skip_torch_16bit:
        for label, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
            dense = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dtype)
            decoders[f"torch_hf_{label}"] = TorchDecoder(dense, prompt_ids, args.new_tokens)
    decoders["torch_native_int4"] = TorchDecoder(native, prompt_ids, args.new_tokens)
    decoders["torch_native_int4_kernel"] = TorchDecoder(native_kernel, prompt_ids, args.new_tokens)
    if have_llama_cpp:
        decoders["llama_cpp_f16"] = LlamaCppDecoder(f16_path, prompt_ids, args.new_tokens, args.threads, args.llama_cpp_extra_buffers)
        decoders["llama_cpp_q4_1"] = LlamaCppDecoder(q4_path, prompt_ids, args.new_tokens, args.threads, args.llama_cpp_extra_buffers)
        decoders["llama_cpp_q4_1_default"] = LlamaCppDecoder(q4_default_path, prompt_ids, args.new_tokens, args.threads, args.llama_cpp_extra_buffers)
    outputs = {name: decode() for name, decode in decoders.items()}  # warm-up round, untimed
    rounds: dict[str, list[float]] = {name: [] for name in decoders}
    cpu_rounds: dict[str, list[float]] = {name: [] for name in decoders}
    for round_index in range(args.repeats):
        for name, decode in decoders.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            tokens = decode()
            rounds[name].append(time.perf_counter() - start)
            cpu_rounds[name].append(time.process_time() - cpu_start)
            assert len(tokens) == args.new_tokens, (name, len(tokens))
        print(f"  decode round {round_index + 1}/{args.repeats}: "
              + ", ".join(f"{n} {args.new_tokens / rounds[n][-1]:.0f}" for n in decoders) + " tok/s", file=sys.stderr)
    reference = outputs["torch_hf_fp32"]
    decode = {}
    for name, times in rounds.items():
        same = next((i for i, (a, b) in enumerate(zip(outputs[name], reference)) if a != b), len(reference))
        decode[name] = {
            "tokens_per_s_best": args.new_tokens / min(times),
            "tokens_per_s_median": args.new_tokens / statistics.median(times),
            "tokens_per_cpu_s_best": args.new_tokens / min(cpu_rounds[name]),
            "rounds_s": times,
            "rounds_cpu_s": cpu_rounds[name],
            "greedy_tokens_equal_to_torch_fp32": same,
        }
    def ratio(a: str, b: str) -> float:
        return decode[a]["tokens_per_s_best"] / decode[b]["tokens_per_s_best"]

    ratios = {
        "native_int4_vs_torch_fp32": ratio("torch_native_int4", "torch_hf_fp32"),
        "native_int4_vs_torch_fp32_cpu_time": (
            decode["torch_native_int4"]["tokens_per_cpu_s_best"] / decode["torch_hf_fp32"]["tokens_per_cpu_s_best"]
        ),
        "native_int4_kernel_vs_torch_fp32": ratio("torch_native_int4_kernel", "torch_hf_fp32"),
        "native_int4_kernel_vs_torch_fp32_cpu_time": (
            decode["torch_native_int4_kernel"]["tokens_per_cpu_s_best"] / decode["torch_hf_fp32"]["tokens_per_cpu_s_best"]
        ),
    }
    if not args.skip_torch_16bit:
        torch_16 = max(("torch_hf_fp16", "torch_hf_bf16"), key=lambda n: decode[n]["tokens_per_s_best"])
        ratios["torch_fastest_16bit"] = torch_16
        ratios["native_int4_vs_torch_fastest_16bit"] = ratio("torch_native_int4", torch_16)
        ratios["native_int4_kernel_vs_torch_fastest_16bit"] = ratio("torch_native_int4_kernel", torch_16)
        ratios["native_int4_kernel_vs_torch_bf16"] = ratio("torch_native_int4_kernel", "torch_hf_bf16")
    if have_llama_cpp:
        ratios["llama_cpp_q4_1_vs_f16"] = ratio("llama_cpp_q4_1", "llama_cpp_f16")
        ratios["llama_cpp_q4_1_default_vs_f16"] = ratio("llama_cpp_q4_1_default", "llama_cpp_f16")
        ratios["llama_cpp_q4_1_vs_torch_fp32"] = ratio("llama_cpp_q4_1", "torch_hf_fp32")
        ratios["llama_cpp_q4_1_vs_f16_cpu_time"] = (
            decode["llama_cpp_q4_1"]["tokens_per_cpu_s_best"] / decode["llama_cpp_f16"]["tokens_per_cpu_s_best"]
        )
        for d in decoders.values():
            if isinstance(d, LlamaCppDecoder):
                d.close()

    sizes = {
        "native_int4_safetensors": report["formats"]["native"]["bytes"],
        "gguf_q4_1": q4_path.stat().st_size,
        "gguf_q4_1_default": q4_default_path.stat().st_size,
        "gguf_f16": f16_path.stat().st_size,
        "hf_16bit_safetensors": (hf_dir / "model.safetensors").stat().st_size,
    }
    verification = {fmt: v.get("verification") for fmt, v in report["formats"].items()}

    # ---- print
    print(f"\nmodel={args.model} QA-BLoRA INT4 g32 budget rank {args.rank} {run} threads={args.threads}")
    if ppl:
        print(f"validation: {ppl['adapter_unmerged']['response_tokens']} response / {ppl['adapter_unmerged']['all_tokens']} tokens")
        print(f"{'model':<30} {'ppl (response)':>14} {'ppl (all tokens)':>16}")
        for name, p in ppl.items():
            print(f"{name:<30} {p['ppl_response']:>14.4f} {p['ppl_all_tokens']:>16.4f}")
    print(f"\ngreedy decode, batch 1, prompt {len(prompt_ids)} tokens + {args.new_tokens} new, {args.repeats} rounds")
    print(f"{'backend':<24} {'best tok/s':>10} {'median tok/s':>12} {'tok/CPU-s':>10} {'greedy = fp32 for':>18}")
    for name, d in decode.items():
        print(f"{name:<24} {d['tokens_per_s_best']:>10.1f} {d['tokens_per_s_median']:>12.1f} {d['tokens_per_cpu_s_best']:>10.1f} "
              f"{d['greedy_tokens_equal_to_torch_fp32']:>12}/{args.new_tokens} tok")
    for key, value in ratios.items():
        print(f"{key}: {value:.3f}" if isinstance(value, float) else f"{key}: {value}")
    print("file sizes (bytes): " + ", ".join(f"{k} {v:,}" for k, v in sizes.items()))

    result = {
        "args": vars(args),
        "run": run,
        "environment": {
            "cpu_count": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "torch": torch.__version__, "llama_cpp_python": getattr(sys.modules.get("llama_cpp"), "__version__", None),
        },
        "prompt_tokens": len(prompt_ids),
        "perplexity": ppl,
        "decode": decode,
        "ratios": ratios,
        "sizes_bytes": sizes,
        "export_verification": verification,
        "gguf_f16": f16_gguf,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {args.out}")
    plot_path = str(Path(args.out).with_suffix(".png"))
    _plot(result, plot_path)
    print(f"wrote {plot_path}")


def _plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not result["perplexity"]:
        fig, ax2 = plt.subplots(1, 1, figsize=(7, 4.5))
        ax1 = None
    else:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    names = list(result["perplexity"])
    values = [result["perplexity"][n]["ppl_response"] for n in names]
    if ax1 is not None:
        bars = ax1.bar(names, values, color=["#bbbbbb"] + ["#2ca02c"] * (len(names) - 1))
        for bar, v in zip(bars, values):
            ax1.annotate(f"{v:.3f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
        ax1.set_yscale("log")
        ax1.set_title("validation perplexity (response tokens, log scale)")
        ax1.tick_params(axis="x", rotation=35, labelsize=8)
    names = list(result["decode"])
    best = [result["decode"][n]["tokens_per_s_best"] for n in names]
    median = [result["decode"][n]["tokens_per_s_median"] for n in names]
    x = range(len(names))
    ax2.bar([i - 0.2 for i in x], best, width=0.4, label="best round", color="#1f77b4")
    ax2.bar([i + 0.2 for i in x], median, width=0.4, label="median round", color="#aec7e8")
    ax2.set_xticks(list(x), names, rotation=35, fontsize=8)
    ax2.set_yscale("log")
    ax2.set_title(f"greedy decode tokens/s, batch 1, {result['args']['new_tokens']} new tokens, {result['args']['threads']} thread(s)")
    ax2.legend(fontsize=8)
    what = f"a random Llama {result['args']['synthetic']} (hidden,intermediate,layers,heads)" if result["args"]["synthetic"] else "the embedded model"
    fig.suptitle(f"QA-BLoRA INT4 g32 export of {what},\n{result['run'].get('params', 0) / 1e6:.1f}M params (CPU, shared machine)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
