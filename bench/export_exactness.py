"""How exactly each runtime runs our QA-BLoRA exports at INT2 / INT3 / INT4 x g32 / g64 / g128.

    OMP_NUM_THREADS=1 python bench/export_exactness.py                 # embedded model, 20 steps each
    python bench/export_exactness.py --bits 4 --group-sizes 32 --steps 5

For every (bits, group size): QA-BLoRA is trained for ``--steps`` on the embedded instruction
set with the settings of ``configs/qablora.yaml`` (LR, warm-up, adapter init args, scale
dtype; no QAT, no dropout), so the adapters are non-zero, then exported
(:func:`qblora_pl.export.export_module`: the native INT-b model and the GGUF file). The
reference is the project's own loader (:func:`qblora_pl.export.load_native`, the exact INT-b
model); every runtime in :data:`RUNTIMES` runs its export on the first ``--prompts`` validation
sequences (pads stripped), and we report per runtime the max |logit difference| to the
reference (also as a fraction of the reference logits' standard deviation) and the share of
positions whose greedy (argmax) token agrees; per export format the artifact's bytes per model
weight (all weights, embeddings included) and, for GGUF, the bytes per weight of the Q4_1
linear layers next to the INT-b ideal ``(b + 32 / g) / 8`` (fp16 scale and offset per group).

Runtimes (add one by adding an entry to :data:`RUNTIMES`):

* ``llama.cpp`` - llama-cpp-python on ``model.gguf`` (its CPU kernels quantize activations to 8
  bits, so its logits differ from any exact evaluation by a few % of their std);
* ``transformers-gguf`` - transformers' GGUF loader (float32 evaluation of the file's weights:
  only the fp16 rounding of the merged offsets shows, and that of the embedding / head, F16
  under the default ``--gguf-dense-type auto`` for this float32 model; ``f32`` keeps them);
* ``transformers-ct`` - transformers + compressed-tensors on the ``compressed-tensors/`` export (the layout
  vLLM / SGLang serve, with integer zero points), dequantized to float32 on CPU. Its model is a second
  training with ``QATSchedule(zero_point: integer)`` from step 0 (the way to an exact export in this
  format), compared with that trained model in memory. Left out when compressed-tensors is not installed
  (``pip install -e ".[vllm]"``);
* ``mlx`` - mlx-lm (:func:`qblora_pl.export.mlx_loader.load_mlx`) on the ``mlx/`` export, whose
  float32 scales and biases hold the reference's weights exactly, so only MLX's vs torch's float32
  kernels show. Left out, with a note, when ``mlx_lm`` is not installed (``pip install -e ".[mlx]"``).

Prints a Markdown table and writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qblora_pl.export.verify import llama_cpp_logits  # noqa: E402  (after the path insert)

Logits = Callable[[Path, list[list[int]], int], list[np.ndarray]]


@dataclass(frozen=True)
class Runtime:
    """A client that runs one export format: ``logits(artifact, prompts_ids, threads)`` returns
    float32 ``(len(ids), vocab)`` logits per prompt."""

    export_format: str  # an export_module format ("gguf", "mlx")
    artifact: str  # path inside the export directory
    logits: Logits


def torch_logits(model, prompts_ids: list[list[int]]) -> list[np.ndarray]:
    model.eval()
    with torch.no_grad():
        return [model(input_ids=torch.tensor([ids])).logits[0].float().numpy() for ids in prompts_ids]


def transformers_gguf_logits(path: Path, prompts_ids: list[list[int]], threads: int) -> list[np.ndarray]:
    from qblora_pl.export.verify import load_gguf

    model, client = load_gguf(path)
    if client != "transformers GGUF loader":
        raise RuntimeError(f"{path}: transformers could not load the file ({client})")
    return torch_logits(model, prompts_ids)


def native_logits(path: Path, prompts_ids: list[list[int]], threads: int) -> list[np.ndarray]:
    from qblora_pl.export import load_native

    return torch_logits(load_native(path), prompts_ids)


def compressed_tensors_logits(path: Path, prompts_ids: list[list[int]], threads: int) -> list[np.ndarray]:
    from qblora_pl.export.compressed_tensors_writer import load_compressed_tensors

    return torch_logits(load_compressed_tensors(path), prompts_ids)


def mlx_logits(path: Path, prompts_ids: list[list[int]], threads: int) -> list[np.ndarray]:
    from qblora_pl.export.mlx_loader import load_mlx

    return torch_logits(load_mlx(path), prompts_ids)


#: The reference: the project's own loader of its native (exact INT-b) export.
REFERENCE = Runtime("native", "native", native_logits)
#: runtime name -> how it runs which export.
RUNTIMES: dict[str, Runtime] = {
    "llama.cpp": Runtime("gguf", "model.gguf", llama_cpp_logits),
    "transformers-gguf": Runtime("gguf", "model.gguf", transformers_gguf_logits),
}
#: runtime name -> its export of a second model, trained with QAT integer zero points
#: (``QATSchedule(zero_point: integer)``), compared with that trained model itself.
QAT_INTEGER_RUNTIMES: dict[str, Runtime] = {}
if importlib.util.find_spec("compressed_tensors") is not None:
    QAT_INTEGER_RUNTIMES["transformers-ct"] = Runtime("compressed-tensors", "compressed-tensors",
                                                      compressed_tensors_logits)
else:
    print("bench/export_exactness.py: compressed-tensors is not installed, no vLLM-format column (pip install -e '.[vllm]')")
if importlib.util.find_spec("mlx_lm") is not None:
    RUNTIMES["mlx"] = Runtime("mlx", "mlx", mlx_logits)
else:
    print("bench/export_exactness.py: mlx_lm is not installed, no MLX column (pip install -e '.[mlx]')")


def compare(reference: list[np.ndarray], other: list[np.ndarray]) -> dict[str, float]:
    diff = max(float(np.abs(o - r).max()) for r, o in zip(reference, other))
    spread = float(np.concatenate(reference).std())
    agree = np.concatenate([r.argmax(-1) == o.argmax(-1) for r, o in zip(reference, other)])
    return {"max_abs_logit_diff": diff, "max_abs_logit_diff_over_std": diff / spread,
            "greedy_agreement": float(agree.mean()), "positions": int(agree.size)}


def artifact_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def gguf_linear_bytes_per_weight(path: Path) -> float:
    import gguf

    tensors = [t for t in gguf.GGUFReader(str(path)).tensors if t.tensor_type == gguf.GGMLQuantizationType.Q4_1]
    return sum(int(t.n_bytes) for t in tensors) / sum(int(t.n_elements) for t in tensors)


def model_weight_count(model) -> int:
    """Weights of the model as a dense network: d_out * d_in per INT-b layer (not its packed
    storage) plus every other frozen tensor (embeddings, norms, head); adapters excluded."""
    from qblora_pl.quantization.int_layer import GroupwiseIntLinear

    count, inside = 0, set()
    for name, module in model.named_modules():
        if isinstance(module, GroupwiseIntLinear):
            count += module.in_features * module.out_features
            inside.update(f"{name}.{key}" for key, _ in module.named_parameters())
    return count + sum(p.numel() for key, p in model.named_parameters() if key not in inside and not p.requires_grad)


def qablora_settings(config_path: Path) -> dict:
    """LR, warm-up, adapter init args and scale dtype of ``configs/qablora.yaml``."""
    import yaml

    model = yaml.safe_load(config_path.read_text())["model"]
    adapter = dict(model["adapter"]["init_args"])
    adapter["dropout"] = 0.0  # deterministic steps; dropout does not change what is exported
    return {
        "learning_rate": float(model["learning_rate"]),
        "warmup_steps": int(model["warmup_steps"]),
        "adapter": adapter,
        "scale_dtype": model["quantization"]["init_args"].get("scale_dtype", "float16"),
    }


def run_one(args, settings: dict, bits: int, group_size: int, data, prompts_ids, out_dir: Path) -> dict:
    import lightning.pytorch as pl

    from bench.accuracy_lib.methods import from_config
    from qblora_pl.export import export_module
    from qblora_pl.module import QuantizedCausalLM

    pl.seed_everything(args.seed)
    quantization, adapter = from_config(Path(args.config), quantization={"bits": bits, "group_size": group_size},
                                        adapter={"dropout": settings["adapter"]["dropout"]})
    module = QuantizedCausalLM(
        args.model, quantization=quantization, adapter=adapter, learning_rate=settings["learning_rate"],
        warmup_steps=settings["warmup_steps"],
    )
    started = time.perf_counter()
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=args.steps, logger=False, enable_checkpointing=False,
        limit_val_batches=0, enable_model_summary=False, gradient_clip_val=0.3, enable_progress_bar=False,
    )
    trainer.fit(module, datamodule=data)
    train_seconds = time.perf_counter() - started
    adapter_norm = float(sum(p.detach().float().norm() ** 2 for p in module.parameters() if p.requires_grad) ** 0.5)
    n_weights = model_weight_count(module.model)

    export_dir = out_dir / f"int{bits}_g{group_size}"
    formats = sorted({REFERENCE.export_format, *(r.export_format for r in RUNTIMES.values())})
    report = export_module(module, export_dir, formats=formats, verify=False, gguf_dense_type=args.gguf_dense_type,
                           log=lambda _: None)
    gguf_report = report["formats"].get("gguf", {})
    row = {
        "bits": bits,
        "group_size": group_size,
        "train_steps": args.steps,
        "train_seconds": round(train_seconds, 1),
        "adapter_norm": adapter_norm,
        "model_weights": n_weights,
        "formats": {},
        "runtimes": {},
        "gguf": {
            "layer_types": gguf_report.get("layer_types"),
            "fallback_layers": len(gguf_report.get("fallback_layers", [])),
            "max_abs_offset_rounding": gguf_report.get("max_abs_offset_rounding"),
            "max_abs_weight_error_exact_layers": gguf_report.get("max_abs_weight_error_exact_layers"),
            "token_embd": gguf_report.get("dense_tensors", {}).get("token_embd.weight", {}).get("gguf_type"),
        },
    }
    for fmt in formats:
        path = Path(report["formats"][fmt]["path"])
        row["formats"][fmt] = {"bytes": artifact_bytes(path), "bytes_per_weight": artifact_bytes(path) / n_weights}
    if "gguf" in formats:
        row["gguf"]["q4_1_linear_bytes_per_weight"] = gguf_linear_bytes_per_weight(export_dir / "model.gguf")
        row["gguf"]["int_b_ideal_bytes_per_weight"] = (bits + 32 / group_size) / 8
    reference = REFERENCE.logits(export_dir / REFERENCE.artifact, prompts_ids, args.threads)
    in_memory = torch_logits(module.model, prompts_ids)
    row["in_memory_vs_reference"] = compare(reference, in_memory)
    for name, runtime in RUNTIMES.items():
        row["runtimes"][name] = compare(reference, runtime.logits(export_dir / runtime.artifact, prompts_ids, args.threads))
    del module, trainer
    if QAT_INTEGER_RUNTIMES:
        row.update(qat_integer_runtimes(args, settings, bits, group_size, data, prompts_ids, export_dir / "qat_integer",
                                        n_weights))
    return row


def qat_integer_runtimes(args, settings: dict, bits: int, group_size: int, data, prompts_ids, export_dir: Path,
                         n_weights: int) -> dict:
    """The same training with QAT integer zero points from step 0, exported to the formats that store
    integer zero points, each compared with the trained model as it computes in memory."""
    import lightning.pytorch as pl

    from bench.accuracy_lib.methods import from_config
    from qblora_pl.callbacks import QATSchedule
    from qblora_pl.export import export_module
    from qblora_pl.module import QuantizedCausalLM

    pl.seed_everything(args.seed)
    quantization, adapter = from_config(Path(args.config), quantization={"bits": bits, "group_size": group_size},
                                        adapter={"dropout": settings["adapter"]["dropout"]})
    module = QuantizedCausalLM(args.model, quantization=quantization, adapter=adapter,
                               learning_rate=settings["learning_rate"], warmup_steps=settings["warmup_steps"])
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=args.steps, logger=False, enable_checkpointing=False,
        limit_val_batches=0, enable_model_summary=False, gradient_clip_val=0.3, enable_progress_bar=False,
        callbacks=[QATSchedule(start_step=0, bits=bits, group_size=group_size, zero_point="integer")],
    )
    trainer.fit(module, datamodule=data)
    trained = torch_logits(module.model, prompts_ids)  # the QAT forward: integer zero points at full strength
    formats = sorted({r.export_format for r in QAT_INTEGER_RUNTIMES.values()})
    report = export_module(module, export_dir, formats=formats, verify=False, log=lambda _: None)
    result = {"qat_integer_formats": {}, "qat_integer_runtimes": {}}
    for fmt in formats:
        size = artifact_bytes(Path(report["formats"][fmt]["path"]))
        result["qat_integer_formats"][fmt] = {"bytes": size, "bytes_per_weight": size / n_weights}
    for name, runtime in QAT_INTEGER_RUNTIMES.items():
        result["qat_integer_runtimes"][name] = compare(
            trained, runtime.logits(export_dir / runtime.artifact, prompts_ids, args.threads))
    del module, trainer
    return result


def markdown(rows: list[dict]) -> str:
    names = list(RUNTIMES)
    head = ["INT-b", "g", "GGUF B/weight (file)", "Q4_1 B/weight (linears)", "INT-b ideal B/weight", "linears Q4_1 / fallback"]
    if "mlx" in names:
        head.append("MLX B/weight (file)")
    qat_names = list(QAT_INTEGER_RUNTIMES)
    if "transformers-ct" in qat_names:
        head.append("compressed-tensors B/weight (file)")
    for name in names:
        head += [f"{name} max abs dlogit (/std)", f"{name} greedy"]
    for name in qat_names:
        head += [f"{name} (QAT integer zero points) max abs dlogit (/std)", f"{name} greedy"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        g = row["gguf"]
        q4_1 = (g["layer_types"] or {}).get("Q4_1", 0)
        cells = [f"INT{row['bits']}", str(row["group_size"]), f"{row['formats']['gguf']['bytes_per_weight']:.3f}",
                 f"{g['q4_1_linear_bytes_per_weight']:.3f}", f"{g['int_b_ideal_bytes_per_weight']:.3f}",
                 f"{q4_1} / {g['fallback_layers']}"]
        if "mlx" in names:
            cells.append(f"{row['formats']['mlx']['bytes_per_weight']:.3f}")
        if "transformers-ct" in qat_names:
            cells.append(f"{row['qat_integer_formats']['compressed-tensors']['bytes_per_weight']:.3f}")
        for name, r in [*((n, row["runtimes"][n]) for n in names), *((n, row["qat_integer_runtimes"][n]) for n in qat_names)]:
            cells += [f"{r['max_abs_logit_diff']:.3g} ({r['max_abs_logit_diff_over_std']:.3f})",
                      f"{r['greedy_agreement']:.3f} ({r['positions']})"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    from qblora_pl.data.datamodule import InstructionDataModule
    from qblora_pl.paths import EMBEDDED_DATA_DIR, EMBEDDED_MODEL_DIR
    from qblora_pl.sources import pretrained_name_or_path

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(EMBEDDED_MODEL_DIR))
    parser.add_argument("--data", default=str(EMBEDDED_DATA_DIR / "instructions"))
    parser.add_argument("--config", default=str(ROOT / "configs" / "qablora.yaml"))
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--group-sizes", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--prompts", type=int, default=8, help="validation sequences compared")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--gguf-dense-type", default="auto", choices=["auto", "f32", "f16", "q8_0"],
                        help="GGUF type of the embedding / head (f32 isolates the Q4_1 linears)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", default=None, help="where the exports go (default: a temporary directory)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "export_exactness.json"))
    args = parser.parse_args()
    args.model = pretrained_name_or_path(args.model)
    torch.set_num_threads(args.threads)
    settings = qablora_settings(Path(args.config))

    data = InstructionDataModule(args.data, tokenizer_name_or_path=args.model, batch_size=8,
                                 max_source_length=256, max_target_length=64)
    data.setup("fit")
    prompts_ids = []
    for batch in data.val_dataloader():
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
            if len(prompts_ids) < args.prompts:
                prompts_ids.append(ids[mask.bool()].tolist())
    import tempfile

    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="export_exactness."))
    rows = []
    for bits in args.bits:
        for group_size in args.group_sizes:
            rows.append(run_one(args, settings, bits, group_size, data, prompts_ids, work))
            r = rows[-1]
            print(f"INT{bits} g{group_size}: " + ", ".join(
                f"{name} max |dlogit| {v['max_abs_logit_diff']:.3g} greedy {v['greedy_agreement']:.3f}"
                for name, v in {**r["runtimes"], **r.get("qat_integer_runtimes", {})}.items()), flush=True)
    table = markdown(rows)
    print("\n" + table)
    result = {
        "command": "python bench/export_exactness.py " + " ".join(sys.argv[1:]),
        "model": os.path.relpath(args.model, ROOT) if Path(args.model).is_relative_to(ROOT) else args.model,
        "config": os.path.relpath(args.config, ROOT),
        "settings": settings,
        "gguf_dense_type": args.gguf_dense_type,
        "prompts": {"count": len(prompts_ids), "tokens": sum(map(len, prompts_ids)), "source": "validation split"},
        "reference": "qblora_pl.export.load_native (native INT-b export)",
        "runtimes": {name: {"export_format": r.export_format, "artifact": r.artifact} for name, r in RUNTIMES.items()},
        "qat_integer_runtimes": {name: {"export_format": r.export_format, "artifact": r.artifact,
                                        "reference": "the model trained with QATSchedule(zero_point: integer), in memory"}
                                 for name, r in QAT_INTEGER_RUNTIMES.items()},
        "rows": rows,
        "markdown": table,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
