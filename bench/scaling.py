"""How training memory and step time grow with model size: synthetic Llama models, our methods vs HF PEFT QLoRA.

    python bench/scaling.py                                  # 135m 500m 1.5b, checkpointing off and on
    python bench/scaling.py --sizes 135m --batch-size 2 --seq-len 64 --out /tmp/scaling.json

Each size is a Llama with real shapes and random weights (``--sizes``; written once, in bfloat16,
under ``$QBLORA_PL_CACHE/synthetic/``: nothing is downloaded). For every size and for gradient
checkpointing off and on, ``bench/step_cost.py`` times one training step of each case in its own
process (QLoRA, QA-LoRA and QA-BLoRA on our bases; PEFT QLoRA over bitsandbytes, the reference), and
splits the case's peak memory into the frozen base, the adapter with its gradients and AdamW state,
the activations autograd saved, and the transient (step_cost.py). The table prints each case's peak
and step time as a ratio to PEFT's at the same size and setting; ``--plot`` draws how they grow.

The 7B column is an estimate, not a measurement: each memory component of the largest measured size
is scaled by its driver to Llama-2-7B's shape (base: quantized parameters; adapter and optimizer:
``r (d_in + d_out)`` summed over the adapted layers; activations: tokens x layers x hidden; transient:
the largest layer's weight count and tokens x vocabulary, whichever the measured split is larger in).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: Llama shapes (random weights). 135m is SmolLM2-135M's; the others keep its vocabulary and tied
#: embeddings and grow width and depth.
SIZES: dict[str, dict] = {
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3),
    "500m": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=30, num_attention_heads=16,
                 num_key_value_heads=4),
    "1.5b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=30, num_attention_heads=32,
                 num_key_value_heads=8),
}
COMMON_SHAPE = dict(vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048)
LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False)
CASES = ("qlora", "qalora", "qablora", "peft_qlora")
COMPONENTS = ("base", "adapter_optimizer", "activations", "transient")


def linear_shapes(shape: dict) -> list[tuple[int, int]]:
    """``(d_out, d_in)`` of the seven adapted projections of one decoder layer."""
    h, i = shape["hidden_size"], shape["intermediate_size"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    return [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]


def parameter_count(shape: dict) -> int:
    layers = shape["num_hidden_layers"] * (sum(o * i for o, i in linear_shapes(shape)) + 2 * shape["hidden_size"])
    embeddings = shape["vocab_size"] * shape["hidden_size"] * (1 if shape.get("tie_word_embeddings", True) else 2)
    return layers + embeddings + shape["hidden_size"]


def synthetic_model_dir(size: str) -> Path:
    """The size's random-weight Llama, saved once (bfloat16 safetensors, config) in the cache."""
    from qblora_pl.sources import cache_root

    shape = {**SIZES[size], **COMMON_SHAPE}
    directory = cache_root() / "synthetic" / f"llama-{size}"
    if (directory / "config.json").exists():
        return directory
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    print(f"writing the synthetic {size} Llama ({parameter_count(shape) / 1e6:.0f}M parameters) to {directory}",
          file=sys.stderr)
    torch.manual_seed(0)
    config = LlamaConfig(bos_token_id=1, eos_token_id=2, **shape)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    tmp = directory.with_name(directory.name + ".tmp")
    model.save_pretrained(tmp)
    tmp.rename(directory)
    return directory


def run_step_cost(size: str, checkpointing: bool, args: argparse.Namespace) -> dict:
    out = Path(args.work_dir) / f"step_cost_{size}_{'ckpt' if checkpointing else 'nockpt'}.json"
    if out.exists() and not args.rerun:
        return json.loads(out.read_text())
    cmd = [sys.executable, str(ROOT / "bench" / "step_cost.py"), "--model", str(synthetic_model_dir(size)),
           "--cases", *args.cases, "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--repeats", "1", "--rank", str(args.rank),
           "--bits", str(args.bits), "--group-size", str(args.group_size), "--out", str(out), "--plot", "/dev/null"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if checkpointing:
        cmd.append("--gradient-checkpointing")
    print(f"{size}, gradient checkpointing {'on' if checkpointing else 'off'}: {' '.join(cmd[1:3])} ...", file=sys.stderr)
    subprocess.run(cmd, check=True)
    return json.loads(out.read_text())


def estimate_7b(result: dict, size: str, args: argparse.Namespace) -> dict[str, int]:
    """Each component of ``result`` (one case at ``size``) scaled to Llama-2-7B by its driver."""
    small, big = {**SIZES[size], **COMMON_SHAPE}, LLAMA2_7B
    split = result["memory_split_bytes"]

    def linear_params(shape):
        return shape["num_hidden_layers"] * sum(o * i for o, i in linear_shapes(shape))

    def adapter_driver(shape):
        return shape["num_hidden_layers"] * sum(o + i for o, i in linear_shapes(shape))

    def activation_driver(shape):
        return args.batch_size * args.seq_len * shape["num_hidden_layers"] * shape["hidden_size"]

    embed = lambda shape: shape["vocab_size"] * shape["hidden_size"] * (1 if shape.get("tie_word_embeddings") else 2)  # noqa: E731
    embed_bytes = 4 * embed(small)  # the float32 (tied) embedding is part of the frozen base
    layer = lambda shape: max(o * i for o, i in linear_shapes(shape))  # noqa: E731
    logits = lambda shape: args.batch_size * args.seq_len * shape["vocab_size"]  # noqa: E731
    per_layer_weight = split["transient"] / layer(small)
    per_logit = split["transient"] / logits(small)
    transient = max(per_layer_weight * layer(big), per_logit * logits(big)) if split["transient"] > 0 else 0
    return {
        "base": int((split["base"] - embed_bytes) / linear_params(small) * linear_params(big) + 4 * embed(big)),
        "adapter_optimizer": int(split["adapter_optimizer"] / adapter_driver(small) * adapter_driver(big)),
        "activations": int(split["activations"] / activation_driver(small) * activation_driver(big)),
        "transient": int(transient),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--checkpointing", nargs="+", default=["off", "on"], choices=["off", "on"])
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--work-dir", default="bench/results/scaling", help="one step_cost JSON per size and setting (kept: a rerun skips them)")
    parser.add_argument("--rerun", action="store_true", help="measure again even where a JSON exists")
    parser.add_argument("--out", default="bench/results/scaling.json")
    parser.add_argument("--plot", default=None, help="PNG (default: --out with .png)")
    args = parser.parse_args()
    if "peft_qlora" not in args.cases:
        parser.error("--cases must include peft_qlora: every figure is a ratio to it")
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)

    rows = []
    for size in args.sizes:
        for setting in args.checkpointing:
            runs = run_step_cost(size, setting == "on", args)["results"]
            peft = runs["peft_qlora"]
            for case in args.cases:
                r = runs[case]
                rows.append({
                    "size": size, "parameters": parameter_count({**SIZES[size], **COMMON_SHAPE}),
                    "checkpointing": setting, "case": case,
                    "peak_bytes": r["total_peak_bytes"], "split_bytes": r["memory_split_bytes"],
                    "step_s": r["step_time_s"], "step_cpu_s": r["step_cpu_s"],
                    "peak_x_peft": r["total_peak_bytes"] / peft["total_peak_bytes"],
                    "step_cpu_x_peft": r["step_cpu_s"] / peft["step_cpu_s"],
                    "estimate_7b_bytes": estimate_7b(r, size, args),
                })
    largest = args.sizes[-1]
    mib = lambda b: b / 2**20  # noqa: E731
    print(f"\nbatch {args.batch_size} x {args.seq_len}, rank {args.rank}, INT{args.bits} g{args.group_size} "
          f"(QA-* bases), NF4 (QLoRA, PEFT); peak = model + training memory; x PEFT at the same size and setting")
    print(f"{'size':>5} {'ckpt':>4} {'case':<11} {'peak MiB':>9} {'x PEFT':>7} {'base':>8} {'adapt+opt':>9} "
          f"{'activ.':>8} {'transient':>9} {'step s':>7} {'CPU x PEFT':>10} {'7B est. GiB':>11}")
    for row in rows:
        s = row["split_bytes"]
        est = sum(row["estimate_7b_bytes"].values()) / 2**30 if row["size"] == largest else None
        print(f"{row['size']:>5} {row['checkpointing']:>4} {row['case']:<11} {mib(row['peak_bytes']):>9.0f} "
              f"{row['peak_x_peft']:>7.2f} {mib(s['base']):>8.0f} {mib(s['adapter_optimizer']):>9.1f} "
              f"{mib(s['activations']):>8.0f} {mib(s['transient']):>9.0f} {row['step_s']:>7.2f} "
              f"{row['step_cpu_x_peft']:>10.2f} {'' if est is None else f'{est:.1f}':>11}")
    print(f"7B est.: the {largest} split scaled to Llama-2-7B's shape component by component (an estimate).")
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    print(f"wrote {args.out}")
    plot = args.plot or str(Path(args.out).with_suffix(".png"))
    _plot(rows, args, plot)
    print(f"wrote {plot}")


def _plot(rows: list[dict], args: argparse.Namespace, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    styles = {"off": "-", "on": "--"}
    for case in args.cases:
        for setting in args.checkpointing:
            sel = [r for r in rows if r["case"] == case and r["checkpointing"] == setting]
            if not sel:
                continue
            x = [r["parameters"] / 1e6 for r in sel]
            label = f"{case}, ckpt {setting}"
            axes[0].plot(x, [r["peak_bytes"] / 2**30 for r in sel], styles[setting], marker="o", label=label)
            axes[1].plot(x, [r["peak_x_peft"] for r in sel], styles[setting], marker="o", label=label)
            axes[2].plot(x, [r["step_cpu_x_peft"] for r in sel], styles[setting], marker="o", label=label)
    sizes = sorted({r["parameters"] / 1e6 for r in rows})
    for ax, title in zip(axes, ("peak memory GiB (model + training)", "peak memory x PEFT QLoRA", "step CPU time x PEFT QLoRA")):
        ax.set_xscale("log")
        ax.set_xticks(sizes, [f"{s:.0f}" for s in sizes])
        ax.minorticks_off()
        ax.set_xlabel("parameters (M)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].axhline(1.0, color="grey", lw=0.8)
    axes[2].axhline(1.0, color="grey", lw=0.8)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"synthetic Llama, batch {args.batch_size}x{args.seq_len}, rank {args.rank}, INT{args.bits} g{args.group_size}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
