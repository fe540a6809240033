#!/usr/bin/env bash
# One command on a CUDA machine, at most 8 minutes, one JSON report (scripts/gpu_check.py says what is in it):
#   bash scripts/gpu_check.sh --out gpu_check.json
# The GPU image has torch (2.11, CUDA 13), transformers, peft and lightning but not bitsandbytes or
# torchao; they travel in .whl/ (git-ignored), fetched once on a machine that reaches the registry:
#   bash scripts/gpu_check.sh --fetch-wheels
# torchao 0.18.0 as its wheel (3.4 MiB); bitsandbytes 0.50.2 unpacked into .whl/site with only its
# CUDA 13 and CPU libraries (the wheel's 43 MiB are mostly CUDA 11/12 builds; the tree may carry
# 64 MiB in all). Both are put on the path before the check; a case whose package is missing is
# reported skipped.
# On CPU the same code paths run with tiny sizes (< 2 minutes):
#   bash scripts/gpu_check.sh --dry-run --out /tmp/gpu_check.json
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || grep -qx '/.whl/' .gitignore || echo '/.whl/' >> .git/info/exclude
    "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl bitsandbytes==0.50.2 torchao==0.18.0
    "$PYTHON" - <<'PY'
import pathlib, re, zipfile
wheel = next(pathlib.Path(".whl").glob("bitsandbytes-*.whl"))
with zipfile.ZipFile(wheel) as archive:
    for name in archive.namelist():  # every file but the CUDA 11/12 and ROCm builds
        if not re.search(r"libbitsandbytes_(cuda1[12]\d|rocm)", name):
            archive.extract(name, ".whl/site")
wheel.unlink()
PY
    du -sh .whl
    exit 0
fi

if compgen -G ".whl/*.whl" > /dev/null; then
    site=/tmp/gpu_check_site
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
if [[ -d .whl/site ]]; then
    export PYTHONPATH="$PWD/.whl/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# 8 minutes in all: gpu_check.py starts no section after --budget-s (420 s by default) and rewrites
# its report after every section, so even a run this timeout stops leaves one.
exec timeout 480 "$PYTHON" scripts/gpu_check.py "$@"
