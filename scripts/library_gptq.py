"""The users' pipeline baseline: GPTQ by the real llm-compressor (0.14), on pre-tokenized calibration data.

Runs under the library's own virtual environment (made by scripts/setup_library_gptq_venv.sh; it pins
transformers <= 5.17 and compressed-tensors 0.19, which conflict with the project's environment), and
so imports nothing from qblora_pl:

    .venvs/llmcompressor/bin/python scripts/library_gptq.py --model DIR --calibration TOKENS.json \\
        --bits 3 --group-size 32 --output OUT_DIR [--dampening-frac 0.01] [--threads N] [--overwrite]

Inputs
  --model        a local dense Hugging Face causal LM folder (config.json without quantization_config,
                 *.safetensors, tokenizer files). It is loaded in float32 whatever its stored dtype, so
                 that GPTQ's output, the compressed checkpoint and the dequantized one agree exactly.
  --calibration  JSON {"sequences": [[token id, ...], ...]}: pre-tokenized sequences, any lengths,
                 no padding. Every id must lie in [0, vocab_size) and no sequence may be longer than
                 the model's max_position_embeddings.

Recipe: one GPTQModifier, config group targets ["Linear"], ignore ["lm_head"], weights
{num_bits: --bits, type: int, symmetric: false, strategy: group, group_size: --group-size,
actorder: null}, dampening_frac --dampening-frac, the default block size (128), the sequential
pipeline (what llm-compressor infers for a modifier that needs calibration data: one decoder
layer at a time, each layer's inputs being the previous, already quantized, layers' outputs).
actorder is set to None on the modifier as well as on the scheme: GPTQModifier's own default is a
sentinel that turns a scheme's actorder None into "static" (weight) activation ordering
(GPTQModifier.resolve_quantization_config); with None the columns are quantized in their natural
order and each group is the contiguous run of group_size input columns. compressed-tensors 0.19 has
no g_idx any more (ActivationOrdering.GROUP was removed), so a module carries only weight_scale and
weight_zero_point, and the script checks that no weight_g_idx appeared.

How llm-compressor 0.14 consumes the pre-tokenized dataset (read in its source, llmcompressor/
datasets/utils.py, args/dataset_arguments.py, pipelines/sequential/pipeline.py,
modifiers/gptq/gptq_quantize.py):
  * get_processed_dataset returns a datasets.Dataset that has an "input_ids" column as it is: no
    tokenization, no chat template, no BOS added, no max_seq_length truncation or padding at this
    stage, no concatenation. The processor it loads is used only by the "padding" collator.
  * The DataLoader's sampler: oneshot's default shuffle_calibration_samples=True gives a
    RandomSampler (a random order, drawn again on every run; with num_samples == len(dataset) no
    sequence is dropped or repeated). This script passes shuffle_calibration_samples=False, which
    gives LengthAwareSampler: the sequences in descending length order (torch.argsort, so equal
    lengths in an order that is deterministic but not necessarily the file's), the first
    num_calibration_samples of them - all of them, as num_calibration_samples = len(sequences).
    GPTQ's Hessian is a sum over sequences, so the order changes it only by float rounding.
  * batch_size=1 (the default) with the default "truncation" collator: each batch is one sequence,
    cut to min(its length, max_seq_length); max_seq_length = the longest sequence, so nothing is
    cut. (With batch_size > 1 that collator would cut every sequence of a batch to the batch's
    shortest, and the "padding" collator would pad with EOS and ignore max_seq_length.)
  * The batch (input_ids, attention_mask of ones) is cached once and fed layer by layer. GPTQ's
    Hessian of a Linear sums x x^T over every token position of every sequence (attention_mask is
    not used to mask positions, which does not matter without padding) and is divided by the
    number of sequences, not tokens: a scale that the dampening (a fraction of the mean diagonal)
    and the GPTQ update do not see.
  * The scales and zero points are min-max over each group of the *original* weights (observed
    once per layer before the GPTQ pass, then fixed); GPTQ then rounds the error-compensated
    weights onto that fixed grid.

Outputs (OUT_DIR)
  compressed/          llm-compressor's own save (save_compressed=True): a compressed-tensors
                       pack-quantized checkpoint, with its tokenizer.
  dequantized/         a dense float32 HF folder: the --model folder's safetensors layout with each
                       quantized Linear weight replaced by compressed-tensors' dequantize(quantize(W))
                       of the in-memory GPTQ result, i.e. scale * (q - zero_point) (exactly what
                       compressed-tensors decompresses from compressed/, checked for every layer);
                       the other tensors as in --model (cast to float32); config.json copied from
                       --model without quantization_config, dtype float32; tokenizer files copied.
                       AutoModelForCausalLM.from_pretrained(OUT_DIR/dequantized) loads it anywhere.
  library_gptq.json    versions, settings, calibration counts, wall time, peak RSS, the command
                       line and the checks' results.

Argument checking (parse_args, validate) needs only the standard library, so the project's tests
import it without llm-compressor; torch, transformers and llm-compressor are imported in run().
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shlex
import shutil
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ALLOWED_BITS = (2, 3, 4, 8)
IGNORE = ("lm_head",)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


class UsageError(ValueError):
    """A bad argument or input file, named with its value; main() prints it and exits 2."""


@dataclass
class Plan:
    model_dir: Path
    calibration: Path
    sequences: list[list[int]]
    bits: int
    group_size: int
    dampening_frac: float
    output: Path
    threads: int | None
    overwrite: bool
    config: dict
    weight_files: list[Path]
    linear_in_features: dict[str, int] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return sum(len(s) for s in self.sequences)

    @property
    def max_seq_length(self) -> int:
        return max(len(s) for s in self.sequences)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="library_gptq.py",
        description="GPTQ by llm-compressor 0.14 on pre-tokenized calibration data "
        "(run with .venvs/llmcompressor/bin/python).",
    )
    p.add_argument("--model", required=True, type=Path, help="local dense HF causal LM folder")
    p.add_argument("--calibration", required=True, type=Path, help='JSON {"sequences": [[ids...], ...]}')
    p.add_argument("--bits", required=True, type=int, help=f"weight bits, one of {ALLOWED_BITS}")
    p.add_argument("--group-size", required=True, type=int, help="contiguous input columns per group")
    p.add_argument("--output", required=True, type=Path, help="output folder (compressed/, dequantized/, library_gptq.json)")
    p.add_argument("--dampening-frac", type=float, default=0.01, help="GPTQ dampening, a fraction of the Hessian's mean diagonal (default 0.01)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --output")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def read_calibration(path: Path, vocab_size: int | None = None, max_positions: int | None = None) -> list[list[int]]:
    """The calibration file's sequences, checked: a non-empty list of non-empty lists of token ids."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--calibration {path}: no such file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"--calibration {path}: not JSON ({e})") from None
    if not isinstance(data, dict) or "sequences" not in data:
        raise UsageError(
            f'--calibration {path}: expected an object {{"sequences": [[token ids...], ...]}}, '
            f"got {type(data).__name__}" + (f" with keys {sorted(data)}" if isinstance(data, dict) else "")
        )
    seqs = data["sequences"]
    if not isinstance(seqs, list) or not seqs:
        raise UsageError(f'--calibration {path}: "sequences" must be a non-empty list of lists of token ids')
    for i, s in enumerate(seqs):
        if not isinstance(s, list) or not s:
            raise UsageError(f"--calibration {path}: sequence {i} is not a non-empty list of token ids: {str(s)[:80]}")
        for j, t in enumerate(s):
            if not isinstance(t, int) or isinstance(t, bool) or t < 0:
                raise UsageError(f"--calibration {path}: sequence {i}, position {j}: {t!r} is not a token id (an int >= 0)")
            if vocab_size is not None and t >= vocab_size:
                raise UsageError(f"--calibration {path}: sequence {i}, position {j}: token id {t} >= the model's vocab_size {vocab_size}")
        if max_positions is not None and len(s) > max_positions:
            raise UsageError(
                f"--calibration {path}: sequence {i} has {len(s)} tokens, more than the model's "
                f"max_position_embeddings {max_positions}"
            )
    return seqs


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape from a .safetensors file's JSON header (no torch needed)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise UsageError(f"--model: {path} is not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000:
            raise UsageError(f"--model: {path} is not a safetensors file (header length {n})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UsageError(f"--model: {path} is not a safetensors file (unreadable header)") from None
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__"}


def model_weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise UsageError(f"--model {model_dir}: the safetensors index names missing files {missing}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise UsageError(f"--model {model_dir}: no *.safetensors weights (a dense HF folder in safetensors is needed)")
    return files


def candidate_linear_in_features(weight_files: list[Path]) -> dict[str, int]:
    """Module name -> in-features of each 2-D weight that GPTQ would quantize (embeddings and lm_head left out).

    Read from the safetensors headers, so that a group size that does not divide a layer's width is
    refused before anything is loaded; run() checks again on the loaded model's nn.Linear modules."""
    out = {}
    for f in weight_files:
        for name, shape in safetensors_shapes(f).items():
            if not name.endswith(".weight") or len(shape) != 2:
                continue
            module = name[: -len(".weight")]
            last = module.rsplit(".", 1)[-1]
            if last in IGNORE or "embed" in last or last in ("wte", "wpe"):
                continue
            out[module] = shape[1]
    return out


def check_group_size(group_size: int, in_features: dict[str, int]) -> None:
    bad = {name: n for name, n in in_features.items() if n % group_size}
    if bad:
        widths = sorted(set(bad.values()))
        example = next(iter(bad))
        raise UsageError(
            f"--group-size {group_size} does not divide the in-features of {len(bad)} linear layer(s) "
            f"(widths {widths}, e.g. {example}: {bad[example]}); "
            f"group sizes that divide every layer: {dividing_group_sizes(in_features.values())}"
        )


def dividing_group_sizes(widths) -> list[int]:
    g = 0
    for w in widths:
        g = math.gcd(g, int(w))
    return [d for d in (8, 16, 32, 64, 128, 256) if g and g % d == 0]


def validate(args: argparse.Namespace) -> Plan:
    """Every check that needs no torch: the values, the model folder, the calibration file."""
    if args.bits not in ALLOWED_BITS:
        raise UsageError(f"--bits {args.bits}: must be one of {', '.join(map(str, ALLOWED_BITS))}")
    if args.group_size <= 0:
        raise UsageError(f"--group-size {args.group_size}: must be a positive number of columns")
    if not (0.0 < args.dampening_frac < 1.0) or math.isnan(args.dampening_frac):
        raise UsageError(f"--dampening-frac {args.dampening_frac}: must be in (0, 1)")
    if args.threads is not None and args.threads <= 0:
        raise UsageError(f"--threads {args.threads}: must be >= 1")

    model_dir = Path(args.model)
    if not model_dir.is_dir():
        raise UsageError(f"--model {model_dir}: no such directory")
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise UsageError(f"--model {model_dir}: no config.json (not a Hugging Face model folder)")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise UsageError(f"--model {model_dir}: config.json is not JSON ({e})") from None
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "?")
        raise UsageError(f"--model {model_dir}: already quantized (quantization_config, quant_method {method}); a dense model is needed")
    if not any((model_dir / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise UsageError(f"--model {model_dir}: no tokenizer files (tokenizer.json / tokenizer_config.json)")
    weight_files = model_weight_files(model_dir)
    in_features = candidate_linear_in_features(weight_files)
    if not in_features:
        raise UsageError(f"--model {model_dir}: no 2-D linear weights found in {[f.name for f in weight_files]}")
    check_group_size(args.group_size, in_features)

    text_config = config.get("text_config") or config
    sequences = read_calibration(
        args.calibration,
        vocab_size=text_config.get("vocab_size"),
        max_positions=text_config.get("max_position_embeddings"),
    )

    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise UsageError(f"--output {output}: exists and is not a directory")
    if output.is_dir() and any(output.iterdir()) and not args.overwrite:
        raise UsageError(f"--output {output}: not empty (pass --overwrite to replace it)")
    return Plan(
        model_dir=model_dir,
        calibration=Path(args.calibration),
        sequences=sequences,
        bits=args.bits,
        group_size=args.group_size,
        dampening_frac=args.dampening_frac,
        output=output,
        threads=args.threads,
        overwrite=args.overwrite,
        config=config,
        weight_files=weight_files,
        linear_in_features=in_features,
    )


def recipe_config(plan: Plan) -> dict:
    """The GPTQModifier's arguments, as they go into the recipe (and into library_gptq.json)."""
    return {
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {
                    "num_bits": plan.bits,
                    "type": "int",
                    "symmetric": False,
                    "strategy": "group",
                    "group_size": plan.group_size,
                    "actorder": None,
                },
            }
        },
        "ignore": list(IGNORE),
        "dampening_frac": plan.dampening_frac,
        "actorder": None,
    }


def run(plan: Plan, argv: list[str]) -> dict:
    t_start = time.perf_counter()
    import torch
    import transformers
    from datasets import Dataset
    from importlib.metadata import version
    from safetensors import safe_open
    from safetensors.torch import save_file

    from compressed_tensors.compressors.base import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    if plan.threads:
        torch.set_num_threads(plan.threads)
    if plan.output.exists() and plan.overwrite:
        shutil.rmtree(plan.output)
    compressed_dir = plan.output / "compressed"
    dequantized_dir = plan.output / "dequantized"
    plan.output.mkdir(parents=True, exist_ok=True)

    # The model, in float32, and the exact check of the group size on its nn.Linear modules.
    model = transformers.AutoModelForCausalLM.from_pretrained(plan.model_dir, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(plan.model_dir)
    linears = {
        name: m.in_features
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] not in IGNORE
    }
    check_group_size(plan.group_size, linears)

    ds = Dataset.from_dict(
        {
            "input_ids": plan.sequences,
            "attention_mask": [[1] * len(s) for s in plan.sequences],
        }
    )
    recipe = GPTQModifier(**recipe_config(plan))
    t_oneshot = time.perf_counter()
    oneshot(
        model=model,
        processor=tokenizer,
        recipe=recipe,
        dataset=ds,
        num_calibration_samples=len(plan.sequences),
        max_seq_length=plan.max_seq_length,
        shuffle_calibration_samples=False,
        batch_size=1,
        pipeline="sequential",
    )
    oneshot_s = time.perf_counter() - t_oneshot

    # The dequantized weights, from llm-compressor's in-memory result: its weight (GPTQ's output) on
    # its weight_scale / weight_zero_point grid, by compressed-tensors' own quantize / dequantize.
    dequantized: dict[str, torch.Tensor] = {}
    scheme_args = None
    max_diff_vs_gptq = 0.0
    with torch.no_grad():
        for name, module in model.named_modules():
            args = getattr(getattr(module, "quantization_scheme", None), "weights", None)
            if args is None or not isinstance(module, torch.nn.Linear):
                continue
            if args.actorder is not None:
                raise RuntimeError(f"{name}: actorder {args.actorder!r} (activation ordering was meant to be off)")
            if hasattr(module, "weight_g_idx"):
                raise RuntimeError(f"{name}: has weight_g_idx (groups are not contiguous)")
            scheme_args = args
            scale, zero_point = module.weight_scale, module.weight_zero_point
            q = quantize(x=module.weight, scale=scale, zero_point=zero_point, args=args, dtype=torch.int8)
            w = dequantize(x_q=q, scale=scale, zero_point=zero_point, args=args, dtype=torch.float32)
            max_diff_vs_gptq = max(max_diff_vs_gptq, (w - module.weight.float()).abs().max().item())
            dequantized[name + ".weight"] = w.cpu().contiguous()
    if set(dequantized) != {n + ".weight" for n in linears}:
        missing = sorted({n + ".weight" for n in linears} - set(dequantized))[:5]
        raise RuntimeError(f"llm-compressor left linear layers unquantized, e.g. {missing}")
    unchanged_params = {
        n: p.detach() for n, p in model.named_parameters() if n not in dequantized and not n.rsplit(".", 1)[-1].startswith("weight_")
    }

    # dequantized/: the source layout, quantized Linear weights replaced, everything float32.
    dequantized_dir.mkdir(parents=True)
    written = set()
    changed_other = []
    for f in plan.weight_files:
        tensors = {}
        with safe_open(str(f), framework="pt") as src:
            for key in src.keys():
                if key in dequantized:
                    tensors[key] = dequantized[key]
                    written.add(key)
                else:
                    t = src.get_tensor(key)
                    t = t.float() if t.is_floating_point() else t
                    if key in unchanged_params and not torch.equal(unchanged_params[key].float(), t):
                        changed_other.append(key)
                    tensors[key] = t.contiguous()
        save_file(tensors, str(dequantized_dir / f.name), metadata={"format": "pt"})
    if written != set(dequantized):
        missing = sorted(set(dequantized) - written)[:5]
        raise RuntimeError(f"--model's safetensors have no tensor for quantized weights {missing} (renamed keys?)")
    if changed_other:
        raise RuntimeError(f"llm-compressor changed parameters it should not have: {changed_other[:5]}")
    index = plan.model_dir / "model.safetensors.index.json"
    if index.is_file():
        shutil.copy2(index, dequantized_dir / index.name)
    config = dict(plan.config)
    config.pop("quantization_config", None)
    config["dtype"] = "float32"
    config.pop("torch_dtype", None)
    (dequantized_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        if (plan.model_dir / name).is_file():
            shutil.copy2(plan.model_dir / name, dequantized_dir / name)

    # compressed/: llm-compressor's own save (this compresses the in-memory model, so it comes last).
    model.save_pretrained(str(compressed_dir), save_compressed=True)
    tokenizer.save_pretrained(str(compressed_dir))
    del model

    # The check: compressed-tensors decompresses compressed/ to exactly dequantized/ (every layer).
    qconfig_raw = json.loads((compressed_dir / "config.json").read_text())["quantization_config"]
    qconfig = QuantizationConfig.model_validate(qconfig_raw)
    scheme = next(iter(qconfig.config_groups.values()))
    compressor = BaseCompressor.get_value_from_registry(qconfig.format)
    comp_tensors = {}
    for f in sorted(compressed_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as src:
            for key in src.keys():
                if key.rsplit(".", 1)[-1].startswith("weight_"):
                    comp_tensors[key] = src.get_tensor(key)
    deq_tensors = {}
    for f in sorted(dequantized_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as src:
            for key in src.keys():
                if key in dequantized:
                    deq_tensors[key] = src.get_tensor(key)
    per_layer = {}
    for key in dequantized:
        module = key[: -len(".weight")]
        local = {
            k[len(module) + 1 :]: v for k, v in comp_tensors.items() if k.rsplit(".", 1)[0] == module
        }
        if "weight_packed" not in local:
            raise RuntimeError(f"compressed/ has no weight_packed for {module} (format {qconfig.format})")
        w = compressor.decompress(local, scheme)["weight"].float()
        per_layer[module] = (w - deq_tensors[key]).abs().max().item()
    first = next(iter(per_layer))
    print(f"check: {first}: max |dequantized - decompressed(compressed/)| = {per_layer[first]:.3g}")
    print(f"check: all {len(per_layer)} quantized layers: max abs diff = {max(per_layer.values()):.3g}")
    print(f"check: max |dequantize(quantize(W_gptq)) - W_gptq| = {max_diff_vs_gptq:.3g}")

    wall_s = time.perf_counter() - t_start
    report = {
        "tool": "scripts/library_gptq.py",
        "versions": {
            name: version(name) for name in ("llmcompressor", "compressed-tensors", "transformers", "torch", "datasets")
        },
        "model": str(plan.model_dir.resolve()),
        "bits": plan.bits,
        "group_size": plan.group_size,
        "dampening_frac": plan.dampening_frac,
        "recipe": {"GPTQModifier": recipe_config(plan)},
        "resolved_weight_args": scheme_args.model_dump(mode="json") if scheme_args is not None else None,
        "compression_format": qconfig.format,
        "quantized_layers": len(per_layer),
        "calibration": {
            "file": str(plan.calibration.resolve()),
            "sequences": len(plan.sequences),
            "tokens": plan.num_tokens,
            "max_seq_length": plan.max_seq_length,
            "order": "descending length (shuffle_calibration_samples=False), batch_size 1, no truncation",
        },
        "torch_threads": torch.get_num_threads(),
        "wall_time_s": round(wall_s, 2),
        "oneshot_time_s": round(oneshot_s, 2),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "checks": {
            "max_abs_diff_dequantized_vs_decompressed": max(per_layer.values()),
            "first_layer": {"name": first, "max_abs_diff": per_layer[first]},
            "max_abs_diff_dequantized_vs_gptq_weight": max_diff_vs_gptq,
        },
        "outputs": {"compressed": str(compressed_dir), "dequantized": str(dequantized_dir)},
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv[:1], *argv]),
    }
    (plan.output / "library_gptq.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"library_gptq: {len(per_layer)} layers, {len(plan.sequences)} sequences / {plan.num_tokens} tokens, "
          f"wall {wall_s:.1f} s (oneshot {oneshot_s:.1f} s), peak RSS {report['peak_rss_mib']} MiB -> {plan.output}")
    return report


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        plan = validate(parse_args(argv))
    except UsageError as e:
        print(f"library_gptq.py: error: {e}", file=sys.stderr)
        return 2
    try:
        import llmcompressor  # noqa: F401
    except ImportError:
        print(
            "library_gptq.py: error: llmcompressor is not importable by this python "
            f"({sys.executable}); run bash scripts/setup_library_gptq_venv.sh and use "
            ".venvs/llmcompressor/bin/python",
            file=sys.stderr,
        )
        return 2
    run(plan, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
