#!/usr/bin/env bash
# One command on a CUDA machine, at most 8 minutes, one JSON report (scripts/gpu_check.py says what is in it):
#   bash scripts/gpu_check.sh --out gpu_check.json
# The GPU image has torch, transformers, peft and lightning but not bitsandbytes or torchao; their
# wheels travel in .whl/ (git-ignored), fetched once on a machine that reaches the package registry:
#   bash scripts/gpu_check.sh --fetch-wheels          # bitsandbytes 0.50.2 + torchao 0.18.0, ~46 MiB
# and are installed into /tmp before the check (cases whose package is missing are reported skipped).
# On CPU the same code paths run with tiny sizes (< 2 minutes):
#   bash scripts/gpu_check.sh --dry-run --out /tmp/gpu_check.json
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || grep -qx '/.whl/' .gitignore || echo '/.whl/' >> .git/info/exclude
    exec "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl bitsandbytes==0.50.2 torchao==0.18.0
fi

if compgen -G ".whl/*.whl" > /dev/null; then
    site=/tmp/gpu_check_site
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# 8 minutes in all: gpu_check.py starts no section after --budget-s (420 s by default) and rewrites
# its report after every section, so even a run this timeout stops leaves one.
exec timeout 480 "$PYTHON" scripts/gpu_check.py "$@"
