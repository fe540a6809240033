"""One run: train a method with one seed (Lightning), deploy it at each low-bit format and score every model;
and the unmodified model's reference rows."""

from __future__ import annotations

import math
import time

import torch

from bench.accuracy_lib.common import DENSE_MERGE, REFERENCE, learning_rate, run_key
from bench.accuracy_lib.evaluation import make_evaluator
from bench.accuracy_lib.methods import base_args, build
from bench.accuracy_lib.plan import (
    missing_formats, missing_library_formats, missing_trained_benchmarks, wants_trained_benchmarks,
)
from bench.accuracy_lib.progress import RunProgress


def make_data(args, seed: int):
    from qblora_pl.data.datamodule import InstructionDataModule

    return InstructionDataModule(
        args.data, tokenizer_name_or_path=args.model_dir, batch_size=args.batch_size, eval_batch_size=args.eval_batch_size,
        prompt_template=args.prompt_template,
        max_source_length=args.max_source_length, max_target_length=args.max_target_length,
        split_seed=0, shuffle_seed=seed,  # a fixed split; the seed sets the init and the data order
        val_fraction=args.holdout_fraction, test_fraction=args.holdout_fraction,
        drop_empty=True,  # Alpaca has records with an empty output; dropped after the split, so it is unchanged
    )


def train_one(args, method: str, seed: int, bits: int | None, group_size: int | None,
              qat_bits: int | None = None, qat_group_size: int | None = None, progress: RunProgress | None = None):
    """Fine-tune one method with one seed; returns (module, datamodule, seconds).

    ``progress``: where a killed attempt of this run saved its trained adapter; then the model
    is built as for training and the adapter loaded (``seconds``: the saved training time), and
    a newly trained adapter is saved there.
    """
    import lightning.pytorch as pl

    from qblora_pl.module import QuantizedCausalLM

    pl.seed_everything(seed, verbose=False)
    quantization, adapter = build(method, args.rank, bits, group_size, args.alpha, base_args(args),
                                  getattr(args, "scale_rank", 0))
    lr = learning_rate(vars(args), method)
    module = QuantizedCausalLM(args.model_dir, quantization=quantization, adapter=adapter, learning_rate=lr, warmup_steps=args.warmup)
    data = make_data(args, seed)
    module.calibration_source = data.calibration_set  # a gptq base calibrates on the training split (split_seed 0)
    if progress is not None and progress.has_adapter():
        module.configure_model()
        seconds = progress.load_adapter(module)
        print(f"{progress.key}: trained adapter loaded from {progress.adapter_path()}", flush=True)
        return module, data, seconds
    if progress is not None and progress.scores():  # parts scored on another machine, whose adapter is not here
        progress.retrained = True
    callbacks = []
    if qat_bits is not None:
        from qblora_pl.callbacks.qat_schedule import QATSchedule

        callbacks.append(QATSchedule(start_step=args.qat_start, ramp_steps=args.qat_ramp, bits=qat_bits, group_size=qat_group_size))
    trainer = pl.Trainer(
        accelerator="auto", devices=1, max_steps=args.steps, logger=False, enable_checkpointing=False,
        limit_val_batches=0, enable_model_summary=False, enable_progress_bar=args.progress,
        gradient_clip_val=0.3, callbacks=callbacks, deterministic=False,
    )
    started = time.perf_counter()
    trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - started
    for layer in module.adapted_layers().values():
        layer.fake_quant = None  # evaluate the model itself; QAT only shaped its training
    if progress is not None:
        progress.save_adapter(module, seconds)
    return module, data, seconds


def run_method(args, method: str, seed: int, bits: int | None, group_size: int | None, qat: bool = False,
               stored: dict[str, dict] | None = None, progress: RunProgress | None = None) -> dict[str, dict]:
    """Train once and return every row this run yields (QA-*: one; QLoRA/Q-BLoRA: trained + PTQ).

    ``qat``: train QLoRA / Q-BLoRA with the QATSchedule callback fake-quantizing the merged
    weight to INT-``bits`` group ``group_size``, then re-quantize to exactly that grid.

    Every row records ``train_seconds`` and ``eval_seconds`` of the whole run (rows of one run
    share them; ``run`` names the run; ``main`` adds the run's process ``cpu_seconds``) and the
    benchmarks asked for next to the loss: the deployed low-bit model always, the trained model
    as ``--bench-trained`` says.

    ``progress``: the run's finished parts from a killed attempt (:class:`RunProgress`), reused.

    ``stored``: rows already made. A QLoRA / Q-BLoRA run whose NF4 row is stored is being
    re-run for re-quantizations a later invocation asks for (``--bits`` / ``--group-sizes``):
    it retrains with the same seed, returns only the missing ``+ptq`` rows, and does not score
    the trained model's benchmarks again. Where the retrained model's held-out loss equals the
    stored one (the same model: training is deterministic on CPU), the new rows reuse the
    stored trained scores; otherwise they keep their own and say ``retrained: true``. A stored
    run whose trained model lacks benchmarks ``--bench-trained`` now asks for (it ran under
    ``none``) is scored on them the same way, and its stored rows come back with them added.
    """
    from qblora_pl.merging import merge_adapters, requantize_merged, unmerge_adapters

    stored = stored or {}
    bench_trained = wants_trained_benchmarks(args, method)
    key = run_key(method, seed, bits, group_size, qat=qat)
    scored = progress.scored if progress is not None else lambda part, ev, m, **kw: ev(m, **kw)
    fill_seconds, refreshed = 0.0, {}
    if qat:
        module, data, seconds = train_one(args, method, seed, None, None, qat_bits=bits, qat_group_size=group_size,
                                          progress=progress)
        model, evaluate = module.model, make_evaluator(args, data, module.device)
        if progress is not None:
            progress.check_retrained(model, evaluate)
        trained = scored("trained", evaluate, model, benchmarks=bench_trained)
        merge_adapters(model)
        requantize_merged(model, bits=bits, group_size=group_size)
        row = {"method": method + "+qat", "seed": seed, "base": "nf4", "bits": bits, "group_size": group_size,
               "trainable_params": sum(p.numel() for p in module.parameters() if p.requires_grad),
               "train_seconds": seconds, "qat_start": args.qat_start, "qat_ramp": args.qat_ramp,
               "trained": trained, "low_bit": scored("low_bit", evaluate, model)}
        unmerge_adapters(model)
        rows = {key: row}
    else:
        module, data, seconds = train_one(args, method, seed, bits, group_size, progress=progress)
        model, evaluate = module.model, make_evaluator(args, data, module.device)
        if progress is not None:
            progress.check_retrained(model, evaluate)
        params = sum(p.numel() for p in module.parameters() if p.requires_grad)
        previous = stored.get(key) if method in DENSE_MERGE else None
        fill = bool(previous) and bool(missing_trained_benchmarks(args, method, seed, stored))
        before = evaluate.seconds
        trained = scored("trained", evaluate, model, benchmarks=bench_trained and (previous is None or fill))
        fill_seconds = evaluate.seconds - before if fill else 0.0
        how = merge_adapters(model)
        common = {"method": method, "seed": seed, "trainable_params": params, "train_seconds": seconds}
        rows = {}
        if method in DENSE_MERGE:
            formats = missing_formats(args, method, seed, stored) if previous else \
                [(b, g) for b in args.bits for g in args.group_sizes]
            if previous is None:
                merged = scored("merged", evaluate, model, benchmarks=False)  # dense + adapter: the trained model up to rounding
                rows[key] = {**common, "base": "nf4", "trained": trained, "merged": merged, "low_bit": None}
            elif math.isclose(trained["loss"], previous["trained"]["loss"], rel_tol=1e-6, abs_tol=0.0):
                if fill:  # the stored model's benchmarks, added to its stored scores and to its +ptq rows' copies
                    trained = fill_trained_benchmarks(previous["trained"], trained)
                    refreshed = refreshed_rows(stored, method, seed, trained, fill_seconds)
                else:
                    trained = previous["trained"]
                if progress is not None and progress.loaded:  # the stored run's own adapter: no training here
                    common["adapter_reused"] = True
            else:
                print(f"warning: {key} retrained for {formats or 'its trained benchmarks'} is not the stored model "
                      f"(held-out loss {trained['loss']:.6f} vs {previous['trained']['loss']:.6f})"
                      + ("; its rows say retrained: true" if formats else "")
                      + ("; its trained benchmarks are not stored (the stored model's kept adapter is not here)"
                         if fill else ""))
                common["retrained"] = True
            for ptq_bits, g in formats:
                unmerge_adapters(model)
                merge_adapters(model)
                requantize_merged(model, bits=ptq_bits, group_size=g)
                rows[run_key(method + "+ptq", seed, ptq_bits, g)] = {
                    **common, "base": "nf4", "bits": ptq_bits, "group_size": g, "trained": trained,
                    "low_bit": scored(f"int{ptq_bits}_g{g}", evaluate, model),
                }
            library = missing_library_formats(args, method, seed, stored)
            if library:
                from bench.library_pipeline import library_gptq_model

                calibration = data.calibration_set(args.calibration_records, args.calibration_seq_len)
            for lib_bits, g in library:  # the users' pipeline: merge, then the library's GPTQ
                unmerge_adapters(model)
                how = merge_adapters(model)
                started = time.perf_counter()
                deployed, record = library_gptq_model(model, how, args.model_dir, calibration, lib_bits, g,
                                                      threads=torch.get_num_threads())
                rows[run_key(method + "+libgptq", seed, lib_bits, g)] = {
                    **common, "base": "nf4", "bits": lib_bits, "group_size": g, "trained": trained,
                    "library_gptq": {**record, "pipeline_seconds": time.perf_counter() - started},
                    "low_bit": scored(f"libgptq_int{lib_bits}_g{g}", evaluate, deployed),
                }
                del deployed
            if previous is not None and (formats or library):
                key += " again for " + ", ".join([f"int{b}_g{g}" for b, g in formats]
                                                 + [f"libgptq int{b}_g{g}" for b, g in library])  # own time in totals
        else:
            assert set(how.values()) == {"offsets"}, how
            rows[key] = {
                **common, "base": f"int{bits}_g{group_size}", "bits": bits, "group_size": group_size,
                "trained": trained, "low_bit": scored("low_bit", evaluate, model),
            }
        unmerge_adapters(model)
    for row in rows.values():
        row.update(eval_seconds=evaluate.seconds - fill_seconds, run=key)
    return {**rows, **refreshed}


def fill_trained_benchmarks(stored: dict, scored: dict) -> dict:
    """A stored trained model's scores plus the benchmarks ``scored`` (the same model, scored again) adds."""
    hits = {**scored.get("hits", {}), **stored.get("hits", {})}  # what was stored stays as it was
    return {**scored, **stored, **({"hits": hits} if hits else {})}


def refreshed_rows(stored: dict[str, dict], method: str, seed: int, trained: dict, seconds: float) -> dict[str, dict]:
    """The stored rows of ``method``'s NF4 run (its NF4 row and every ``+ptq`` row, which copy its trained
    scores) with ``trained`` in place; the NF4 row adds the time it took (``trained_benchmark_seconds``)."""
    rows, nf4 = {}, run_key(method, seed, None, None)
    for key, row in stored.items():
        if row.get("seed") == seed and key.split("|")[0] in (method, method + "+ptq", method + "+libgptq"):  # not +qat
            rows[key] = {**row, "trained": trained}
            if key == nf4:
                rows[key]["trained_benchmark_seconds"] = row.get("trained_benchmark_seconds", 0.0) + seconds
    return rows


def run_reference(args, bits: int | None, group_size: int | None) -> dict[str, dict]:
    """The unmodified model, dense float32 (``bits`` None) or quantized to INT-``bits`` g (``--base-init``), scored untrained.

    Scored on the same held-out batches and benchmarks as the trained runs. The INT-b model is
    exactly the base QA-LoRA / QA-BLoRA start from (``GroupwiseInt`` rounds the float32 weights).
    Dense: ``trained`` holds its scores (it is not a low-bit model); INT-b: ``low_bit``.
    """
    from qblora_pl.quantization import GroupwiseInt, NoQuantization

    started = time.perf_counter()
    if bits is None:
        quantization = NoQuantization(compute_dtype="float32")
    else:
        quantization = GroupwiseInt(bits=bits, group_size=group_size, **base_args(args))
    data = make_data(args, seed=0)
    model = quantization.load(args.model_dir, calibration=data.calibration_set).eval()
    load_seconds = time.perf_counter() - started
    evaluate = make_evaluator(args, data, next(model.parameters()).device)
    scores = evaluate(model)
    key = run_key(REFERENCE, None, bits, group_size)
    base = key.split("|")[1]
    return {key: {"method": REFERENCE, "seed": None, "base": base, "bits": bits, "group_size": group_size,
                  "trainable_params": 0, "train_seconds": 0.0, "load_seconds": load_seconds,
                  "eval_seconds": evaluate.seconds, "run": key,
                  "trained": scores if bits is None else None, "low_bit": None if bits is None else scores}}
