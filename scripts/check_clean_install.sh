#!/usr/bin/env bash
# A new user's install, checked: a clean virtual environment, `pip install -e .` with no extras
# (after torch's CPU wheel, as README says), then a short fit of every shipped method config on
# the embedded model. Catches a runtime dependency that only a test extra pulled in.
#   bash scripts/check_clean_install.sh [VENV_DIR]      (default: a temporary directory)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-$(mktemp -d)/venv}"
python -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q torch==2.13.0
"$VENV/bin/python" -m pip install -q -e .
WORK="$(mktemp -d)"
for config in configs/qlora.yaml configs/qblora.yaml configs/qalora.yaml configs/qablora.yaml; do
    echo "== $config"
    (cd "$WORK" && OMP_NUM_THREADS=1 "$VENV/bin/python" "$OLDPWD/main.py" fit --config "$OLDPWD/$config" \
        --trainer.max_steps 2 --trainer.val_check_interval 2 --trainer.limit_val_batches 1 \
        --trainer.logger false --trainer.enable_checkpointing false --trainer.callbacks=[] > "$WORK/fit.log" 2>&1) \
        || { tail -20 "$WORK/fit.log"; echo "FAILED: $config"; exit 1; }
    grep -q "max_steps=2\` reached" "$WORK/fit.log" && echo "ok: $config"
done
echo "clean install: every method config fits"
