"""Accuracy at equal trainable parameters: every method, several bit widths, several seeds.

    python bench/accuracy.py                                         # embedded model + data
    python bench/accuracy.py --data ../shared/data/alpaca_5000.json --tag alpaca
    python bench/accuracy.py --seeds 0 1 2 --bits 4 3 2 --group-sizes 32 64 --steps 100
    python bench/accuracy.py --report-only --markdown                # tables and plots of the stored runs
    python bench/accuracy.py --lr-report bench/results/accuracy_<tag>_val*.json   # LRs, chosen on val

The entry point: the code is bench/accuracy_lib/ (one module per job, listed in its __init__.py),
the options are ``python bench/accuracy.py --help``, and what each option and stored field is for,
with the SmolLM2 grid (bench/smollm2_grid.sh), is docs/benchmarks.md, part (a).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.accuracy_lib import *  # noqa: E402,F401,F403  (`from bench import accuracy` keeps its names)
from bench.accuracy_lib.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
