"""docs/extending.md's three recipes, as working code: copy one to start your own.

* :class:`RSLoRA` - an adapter method (rank-stabilized LoRA: ``s = alpha / sqrt(r)``), named in YAML as
  ``model.adapter.class_path: your_package.RSLoRA``;
* :class:`TorchStateDictFormat` - an export format, named in ``MergeExport(formats: [...])`` or
  ``main.py export --formats`` by its import path (or by ``name`` once registered);
* :class:`KeywordRecall` - an evaluation task, named in ``EvaluationSuite(tasks: [...])`` by ``class_path``.

tests/extending/test_recipes.py runs each through ``main.py`` as a user would.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qblora_pl.adapters.lora import LoRA, LoRAAdapter
from qblora_pl.evaluation.base import EvaluationDataError, EvaluationTask, outcomes, read_records, require_text
from qblora_pl.evaluation.scoring import LanguageModelScorer
from qblora_pl.export.formats import ExportContext, ExportFormat


# ---------------------------------------------------------------- an adapter method
class RSLoRA(LoRA):
    """Rank-stabilized LoRA (Kalajdzievski, 2023): LoRA with the scaling ``alpha / sqrt(r)``.

    The factors, their initialisation and the merge are LoRA's, so only the scaling changes.
    """

    name = "rslora"

    def build_adapter(self, layer_name: str, base: nn.Module, d_in: int, d_out: int) -> LoRAAdapter:
        return LoRAAdapter(d_in, d_out, self.r, self.alpha / math.sqrt(self.r))


# ---------------------------------------------------------------- an export format
class TorchStateDictFormat(ExportFormat):
    """The merged model as one ``torch.save`` file of dense tensors, beside its ``config.json``.

    ``format_options: {torch-state-dict: {dtype: bfloat16}}`` sets the stored dtype (float32 by default).
    """

    name = "torch-state-dict"
    location = "torch"

    def write(self, context: ExportContext) -> dict[str, Any]:
        dtype = getattr(torch, context.options.of(self.name).get("dtype", "float32"))
        linears = context.snapshot.linears.items()
        tensors = {f"{name}.weight": linear.dense_weight().to(dtype) for name, linear in linears}
        tensors.update({f"{name}.bias": linear.bias.to(dtype) for name, linear in linears if linear.bias is not None})
        tensors.update({key: t.to(dtype) if t.is_floating_point() else t for key, t in context.snapshot.others.items()})
        path = context.path(self)
        path.mkdir(parents=True)
        context.snapshot.config.save_pretrained(path)
        torch.save(tensors, path / "model.pt")
        return {"path": str(path), "bytes": (path / "model.pt").stat().st_size, "dtype": str(dtype)}

    def load(self, path: Path) -> tuple[nn.Module, str]:
        from transformers import AutoConfig, AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.float32)
        model.load_state_dict({k: v.float() for k, v in torch.load(path / "model.pt").items()}, strict=False)
        if getattr(model.config, "tie_word_embeddings", False):
            model.tie_weights()
        return model.eval(), "torch.load + AutoModelForCausalLM.from_config"


# ---------------------------------------------------------------- an evaluation task
class KeywordRecall(EvaluationTask):
    """Does the model rank the record's ``keyword`` above a ``distractor`` after its ``prompt``?

    Records: a ``.json`` / ``.jsonl`` / ``.csv`` file of ``{"prompt", "keyword", "distractor"}``.
    Reports ``acc`` (keyword more likely) and ``margin`` (mean log-likelihood difference).
    """

    default_name = "keyword_recall"

    def __init__(self, data_path: str, name: str | None = None, limit: int | None = None) -> None:
        super().__init__(name, limit)
        self.data_path = data_path
        self.records: list[dict[str, str]] = []

    def _load(self) -> None:  # every record is checked before the model loads
        for row, record in enumerate(read_records(self.data_path)):
            where = f"{self.data_path} row {row}"
            if not isinstance(record, dict):
                raise EvaluationDataError(f"{where}: expected an object, got {type(record).__name__}")
            self.records.append({key: require_text(record, key, where) for key in ("prompt", "keyword", "distractor")})

    def num_examples(self) -> int:
        return len(self._limited(self.records))

    def _evaluate(self, scorer: LanguageModelScorer) -> dict[str, float]:
        records = self._limited(self.records)
        requests = [scorer.encode_pair(r["prompt"], " " + r[key]) for r in records for key in ("keyword", "distractor")]
        scores = [total for total, _greedy in scorer.loglikelihoods(requests, desc=self.name)]
        margins = [scores[2 * i] - scores[2 * i + 1] for i in range(len(records))]
        hits = [m > 0 for m in margins]
        self.per_example = {"acc": outcomes(hits)}
        return {"acc": sum(hits) / len(hits), "margin": sum(margins) / len(margins)}

    def config(self) -> dict[str, Any]:
        return {**super().config(), "data_path": self.data_path}
