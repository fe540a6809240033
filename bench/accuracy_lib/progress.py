"""The finished parts of a run in progress (trained adapter, each scored model), so a killed run resumes."""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path

import torch

from bench.accuracy_lib.common import BENCH_METRICS


class RunProgress:
    """The finished parts of one run in progress - its trained adapter and each scored model -
    so that a run killed part-way (a session ends during a 2 h QLoRA run) resumes from its last
    finished part instead of from scratch.

    Kept in ``<out stem>.partial/<run>/`` next to the results file (``adapter.pt``: the trainable
    parameters and the training time; ``scores.json``: each part's scores and seconds), written
    atomically, tagged with the results file's settings (a directory made under other settings
    is discarded, not used), and removed once the run's rows are stored.

    ``keep``: where the trained adapter of a finished run goes when its rows are stored (QLoRA /
    Q-BLoRA: one training serves every re-quantization a later call asks for), tagged with the
    settings; ``has_adapter`` / ``load_adapter`` use it when no partial adapter is there. A kept
    adapter made under other settings is ignored (and replaced when the run is made again).

    ``scores.json`` is small and committed with the results (``adapter.pt``, 10 MB for SmolLM2, is
    not): a session that ends mid-run hands the next one - a fresh checkout, without the adapter -
    the parts it scored. That session retrains the run (same seed; training is deterministic on
    CPU), re-scores the trained model's held-out loss, and reuses the stored parts only if it
    equals the stored one (:meth:`check_retrained`); otherwise it scores everything again.
    """

    def __init__(self, out: Path, key: str, settings: dict, keep: bool = False) -> None:
        self.key, self.settings = key, settings
        self.retrained = False  # trained here while scores.json holds parts of another attempt
        self.loaded = False  # the adapter was loaded (partial or kept), not trained by this call
        name = key.replace("|", "_").replace(" ", "_")
        self.directory = out.with_name(out.stem + ".partial") / name
        self.kept = out.with_name(out.stem + ".adapters") / f"{name}.pt" if keep else None
        meta = self.directory / "settings.json"
        if self.directory.exists() and (not meta.is_file() or json.loads(meta.read_text()) != settings):
            print(f"{key}: discarding {self.directory}, made under other settings", flush=True)
            self.clear()

    def _start(self) -> None:
        from qblora_pl.atomic import atomic_file

        if not (self.directory / "settings.json").is_file():
            self.directory.mkdir(parents=True, exist_ok=True)
            with atomic_file(self.directory / "settings.json") as tmp:
                tmp.write_text(json.dumps(self.settings, indent=1))

    def adapter_path(self) -> Path | None:
        """The partial adapter of an interrupted attempt, else a kept one made under these settings."""
        if (self.directory / "adapter.pt").is_file():
            return self.directory / "adapter.pt"
        if self.kept is not None and self.kept.is_file():
            saved = torch.load(self.kept, map_location="cpu", weights_only=True)
            if saved.get("settings") == self.settings:
                return self.kept
            print(f"{self.key}: ignoring {self.kept}, made under other settings", flush=True)
        return None

    def has_adapter(self) -> bool:
        return self.adapter_path() is not None

    def save_adapter(self, module, seconds: float) -> None:
        from qblora_pl.atomic import atomic_file

        self._start()
        state = {name: p.detach().cpu().clone() for name, p in module.named_parameters() if p.requires_grad}
        with atomic_file(self.directory / "adapter.pt") as tmp:
            torch.save({"state": state, "train_seconds": seconds, "settings": self.settings}, tmp)

    def load_adapter(self, module) -> float:
        path = self.adapter_path()
        saved = torch.load(path, map_location="cpu", weights_only=True)
        trainable = {name: p for name, p in module.named_parameters() if p.requires_grad}
        if set(saved["state"]) != set(trainable):
            raise RuntimeError(f"{path} holds other parameters than {self.key} trains; delete it")
        with torch.no_grad():
            for name, value in saved["state"].items():
                trainable[name].copy_(value)
        self.loaded = True
        return saved["train_seconds"]

    def scores(self) -> dict[str, dict]:
        path = self.directory / "scores.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def check_retrained(self, model, evaluate) -> None:
        """After retraining (no saved adapter): keep the stored parts only if the retrained model's
        held-out loss equals the stored trained loss - the same model - else drop them."""
        if not self.retrained:
            return
        self.retrained = False
        stored = self.scores().get("trained")
        loss = evaluate(model, benchmarks=False)["loss"] if stored else None
        if stored and math.isclose(loss, stored["scores"]["loss"], rel_tol=1e-6, abs_tol=0.0):
            print(f"{self.key}: retrained model's held-out loss {loss:.6f} equals the interrupted attempt's; "
                  f"its scored parts ({', '.join(self.scores())}) are reused", flush=True)
            return
        compared = f"{loss:.6f} vs {stored['scores']['loss']:.6f}" if stored else "not stored"
        print(f"{self.key}: the interrupted attempt's scores are not this model's (held-out loss {compared}); "
              "scoring everything", flush=True)
        (self.directory / "scores.json").unlink(missing_ok=True)

    def scored(self, part: str, evaluate, model, **kwargs) -> dict:
        """``evaluate(model, **kwargs)``, or the scores an earlier attempt stored for ``part``."""
        from qblora_pl.atomic import atomic_file

        done = self.scores()
        if part in done:
            evaluate.seconds += done[part]["seconds"]
            print(f"{self.key}: {part} scored by an interrupted attempt; reused", flush=True)
            return done[part]["scores"]
        before = evaluate.seconds
        result = evaluate(model, **kwargs)
        self._start()
        done = {**self.scores(), part: {"scores": result, "seconds": evaluate.seconds - before}}
        with atomic_file(self.directory / "scores.json") as tmp:
            tmp.write_text(json.dumps(done, indent=1))
        shown = ", ".join(f"{m} {result[m]:.4f}" for m in ("loss", *BENCH_METRICS) if m in result)
        print(f"{self.key}: {part} scored ({shown}; {evaluate.seconds - before:.0f}s)", flush=True)
        return result

    def clear(self, keep_adapter: bool = True) -> None:
        """Remove the partial parts of a run; its adapter moves to ``kept`` when one is asked for and
        ``keep_adapter`` (False when nothing was stored: the adapter is not the stored run's model)."""
        import shutil

        adapter = self.directory / "adapter.pt"
        if keep_adapter and self.kept is not None and adapter.is_file():
            self.kept.parent.mkdir(parents=True, exist_ok=True)
            os.replace(adapter, self.kept)  # same folder tree, so one atomic rename
        shutil.rmtree(self.directory, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.directory.parent.rmdir()  # the .partial folder, once no run is in progress
