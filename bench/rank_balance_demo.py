"""LoRA vs Q-BLoRA at the same budget: how much rank does each update actually use?

    python bench/rank_balance_demo.py                          # embedded model and data
    python bench/rank_balance_demo.py --model DIR --data FILE  # any HF Llama dir / json data
    python bench/rank_balance_demo.py --scratch-model /tmp/rb-llama --data /work/shared/data/alpaca_5000.json

Trains LoRA (r) and Q-BLoRA (r, k_in = k_out = m = 2) for the same number of optimizer steps,
from the same seed, on the same batches, with the same learning rate and base quantization,
and prints, side by side, their trainable parameter counts (equal by construction, docs/method.md
section 2) and the mean effective / stable rank of their updates as measured by
``qblora_pl.callbacks.RankBalanceDiagnostics`` - the paper's thesis in two numbers.

It also times the diagnostics callback inside those runs (every hook it runs, TensorBoard
histograms and figure included) against the training loop, which is how docs/rank_balance.md
states its overhead.

``--scratch-model DIR`` is the fallback when no pretrained model is at hand: it writes a
randomly initialised Llama (hidden 256, intermediate 768, 4 layers, 4 heads) with a byte-level
BPE tokenizer (vocab 4096) trained on the training data's text, then uses it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

from qblora_pl.callbacks.rank_balance import RankBalanceDiagnostics  # noqa: E402


class TimedRankBalance(RankBalanceDiagnostics):
    """The diagnostics callback with a stopwatch on its per-step hooks."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.hook_seconds = 0.0  # every on_before_optimizer_step / on_train_batch_end call
        self.log_calls: list[float] = []  # seconds of each step that measured and logged
        self.history: list[tuple[int, float, float]] = []  # (step, mean effective rank, mean stable rank)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        start = time.perf_counter()
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        self.hook_seconds += time.perf_counter() - start

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        start = time.perf_counter()
        before = self.last_logged_step
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        elapsed = time.perf_counter() - start
        self.hook_seconds += elapsed
        if self.last_logged_step != before:
            self.log_calls.append(elapsed)
            self._record(pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        before = self.last_logged_step
        super().on_train_end(trainer, pl_module)
        if self.last_logged_step != before:
            self._record(pl_module)

    def _record(self, pl_module) -> None:
        row = self.group_summary(pl_module)["all"]
        self.history.append((self.last_logged_step, row["effective_rank"], row["stable_rank"]))


class LoopTimer(pl.Callback):
    """Wall time of the training loop (first batch start to last batch end) and the losses."""

    def __init__(self) -> None:
        self.start: float | None = None
        self.end = 0.0
        self.losses: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.start is None:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))
        self.end = time.perf_counter()


def build_scratch_model(directory: Path, data_path: str, vocab_size: int = 4096) -> Path:
    """A random-init Llama (256 / 768 / 4 layers / 4 heads) and a BPE tokenizer fit to the data."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if (directory / "config.json").exists():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    path = Path(data_path)
    files = sorted(path.glob("train.json*")) if path.is_dir() else [path]
    texts = []
    for file in files:
        raw = file.read_text()
        records = json.loads(raw) if file.suffix == ".json" else [json.loads(line) for line in raw.splitlines() if line.strip()]
        texts += [" ".join(str(r.get(k, "")) for k in ("instruction", "input", "output")) for r in records]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(texts + ["Below is an instruction that describes a task. ### Instruction: ### Input: ### Response:"], trainer)
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    wrapped.save_pretrained(directory)
    config = LlamaConfig(
        vocab_size=len(wrapped), hidden_size=256, intermediate_size=768, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
        bos_token_id=wrapped.bos_token_id, eos_token_id=wrapped.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def run_method(method: str, args: argparse.Namespace, logdir: Path) -> dict:
    from lightning.pytorch.loggers import TensorBoardLogger

    from qblora_pl.adapters import LoRA, QBLoRA
    from qblora_pl.data.datamodule import InstructionDataModule
    from qblora_pl.module import QuantizedCausalLM
    from qblora_pl.quantization import NF4, NoQuantization

    pl.seed_everything(args.seed, verbose=False)
    adapter = (
        LoRA(r=args.rank, alpha=2 * args.rank, dropout=0.0)
        if method == "lora"
        else QBLoRA(r=args.rank, alpha=2 * args.rank, k_in=2, k_out=2, rank_multiplier=2, dropout=0.0)
    )
    quantization = NF4() if args.quantization == "nf4" else NoQuantization()
    module = QuantizedCausalLM(
        args.model, quantization=quantization, adapter=adapter, learning_rate=args.lr, warmup_steps=args.warmup
    )
    data = InstructionDataModule(
        args.data, tokenizer_name_or_path=args.model, batch_size=args.batch_size,
        max_source_length=args.max_source_length, max_target_length=args.max_target_length,
        max_train_examples=args.max_train_examples, split_seed=args.seed,
        drop_empty=True,  # Alpaca has records with an empty output
    )
    diagnostics = TimedRankBalance(every_n_steps=args.every_n_steps, print_summary=False)  # printed below
    timer = LoopTimer()
    trainer = pl.Trainer(
        accelerator="cpu" if not torch.cuda.is_available() else "auto",
        max_steps=args.steps,
        logger=TensorBoardLogger(logdir, name=method),
        callbacks=[diagnostics, timer],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        gradient_clip_val=0.3,
        log_every_n_steps=10,
    )
    trainer.fit(module, datamodule=data)
    summary = diagnostics.group_summary(module)
    loop_seconds = timer.end - timer.start
    train_seconds = loop_seconds - diagnostics.hook_seconds
    return {
        "method": method,
        "adapter": repr(adapter),
        "trainable_params": sum(p.numel() for p in module.parameters() if p.requires_grad),
        "steps": trainer.global_step,
        "final_loss": sum(timer.losses[-10:]) / max(len(timer.losses[-10:]), 1),
        "groups": summary,
        "history": diagnostics.history,
        "step_seconds": train_seconds / max(trainer.global_step, 1),
        "callback_seconds_per_log": sum(diagnostics.log_calls) / max(len(diagnostics.log_calls), 1),
        "callback_seconds_total": diagnostics.hook_seconds,
        "overhead_fraction": diagnostics.hook_seconds / max(train_seconds, 1e-9),
        "summary_table": diagnostics.summary_table(module),
    }


def main() -> None:
    from qblora_pl.paths import EMBEDDED_DATA_DIR, EMBEDDED_MODEL_DIR

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(EMBEDDED_MODEL_DIR), help="HF Llama directory (default: embedded model)")
    parser.add_argument("--data", default=str(EMBEDDED_DATA_DIR / "instructions"), help="instruction data (default: embedded set)")
    parser.add_argument("--scratch-model", type=Path, default=None,
                        help="build (if missing) and use a random-init 256-wide Llama in this directory")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per method")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank = Q-BLoRA budget rank")
    parser.add_argument("--lr", type=float, default=2e-4, help="learning rate shared by both (QLoRA's 2e-4)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-source-length", type=int, default=256)
    parser.add_argument("--max-target-length", type=int, default=64)
    parser.add_argument("--max-train-examples", type=int, default=None)
    parser.add_argument("--quantization", choices=["nf4", "none"], default="nf4", help="base storage (same for both)")
    parser.add_argument("--every-n-steps", type=int, default=50, help="diagnostics interval (the callback's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--logdir", type=Path, default=None, help="TensorBoard directory (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    if args.model:  # a .gguf file: its converted HF directory (qblora_pl.sources)
        from qblora_pl.sources import pretrained_name_or_path

        args.model = pretrained_name_or_path(args.model)
    if args.scratch_model is not None:
        args.model = str(build_scratch_model(args.scratch_model, args.data))
    if args.model == str(EMBEDDED_MODEL_DIR) and not (EMBEDDED_MODEL_DIR / "config.json").exists():
        raise SystemExit(f"the embedded model is not built ({EMBEDDED_MODEL_DIR}): pass --model DIR or --scratch-model DIR")
    if args.data == str(EMBEDDED_DATA_DIR / "instructions") and not Path(args.data).exists():
        raise SystemExit(f"the embedded data set is not built ({args.data}): pass --data PATH")

    logdir = args.logdir or Path(tempfile.mkdtemp(prefix="rank_balance_demo_"))
    results = {method: run_method(method, args, logdir) for method in ("lora", "qblora")}

    print(f"\nmodel={args.model}\ndata={args.data}\nsteps={args.steps} lr={args.lr} rank={args.rank} "
          f"batch={args.batch_size} base={args.quantization} seed={args.seed} tensorboard={logdir}")
    for r in results.values():
        print(f"\n{r['adapter']}\n{r['summary_table']}")
    print(f"\n{'':<28}{'LoRA':>14}{'Q-BLoRA':>14}")
    lora, qb = results["lora"], results["qblora"]
    rows = [
        ("trainable params", lambda r: f"{r['trainable_params']:,}"),
        ("max rank (mean over layers)", lambda r: f"{r['groups']['all']['max_rank']:.1f}"),
        ("effective rank (mean)", lambda r: f"{r['groups']['all']['effective_rank']:.2f}"),
        ("stable rank (mean)", lambda r: f"{r['groups']['all']['stable_rank']:.2f}"),
        ("|dW|/|W_hat| (mean)", lambda r: f"{r['groups']['all']['relative_update_norm']:.2e}"),
        ("train loss (last 10 steps)", lambda r: f"{r['final_loss']:.4f}"),
        ("step time (ms, w/o callback)", lambda r: f"{1000 * r['step_seconds']:.0f}"),
        ("callback ms per logging step", lambda r: f"{1000 * r['callback_seconds_per_log']:.0f}"),
        ("callback overhead", lambda r: f"{100 * r['overhead_fraction']:.2f}%"),
    ]
    for label, fmt in rows:
        print(f"{label:<28}{fmt(lora):>14}{fmt(qb):>14}")
    print("\neffective rank (mean) at each logged step:")
    for (step, lo, _), (_, q, _) in zip(lora["history"], qb["history"]):
        print(f"  step {step:>5}: LoRA {lo:6.2f}   Q-BLoRA {q:6.2f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        for r in results.values():
            r.pop("summary_table")
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
