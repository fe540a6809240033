"""The framework's Lightning callbacks, installed as ``qblora_pl.callbacks``.

The folder sits at the top of the repository (``callbacks/``) and is packaged inside
``qblora_pl`` (``qblora_pl/callbacks`` links to it), so configs name them as
``class_path: qblora_pl.callbacks.MergeExport`` and nothing called ``callbacks`` lands in
site-packages.

===========================  ==================================================================
``AdapterCheckpoint``        Lightning's ``ModelCheckpoint`` made safe: adapters only, never a
                             non-finite one, Ctrl-C stops at a step boundary
``RankBalanceDiagnostics``   effective / stable rank of every adapter update, to TensorBoard
``QATSchedule``              fake-quantization strength schedule (QA methods)
``MergeExport``              merge and export the low-bit model at the end of ``fit``
``EvaluationSuite``          benchmarks in ``main.py test``
``StepProgressBar``          the progress bar ``main.py`` adds when none is configured
===========================  ==================================================================
"""

if __name__ == "callbacks":  # imported as the top-level folder of a checkout, not as the package
    raise ImportError(
        "the callbacks are part of the package now: import qblora_pl.callbacks (in YAML: "
        "class_path: qblora_pl.callbacks.MergeExport, qblora_pl.callbacks.AdapterCheckpoint, ...)"
    )

from qblora_pl.callbacks.checkpoint import AdapterCheckpoint, GracefulInterrupt
from qblora_pl.callbacks.evaluation import EvaluationSuite
from qblora_pl.callbacks.merge_export import MergeExport
from qblora_pl.callbacks.progress import StepProgressBar
from qblora_pl.callbacks.qat_schedule import QATSchedule
from qblora_pl.callbacks.rank_balance import RankBalanceDiagnostics

__all__ = [
    "AdapterCheckpoint", "EvaluationSuite", "GracefulInterrupt", "MergeExport", "QATSchedule",
    "RankBalanceDiagnostics", "StepProgressBar",
]
