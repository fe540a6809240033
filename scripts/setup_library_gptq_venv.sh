#!/usr/bin/env bash
# The "users' pipeline" baseline's own environment: llm-compressor 0.14 (GPTQ) in .venvs/llmcompressor.
# It is kept apart from the project's environment because llmcompressor 0.14.0.1 pins
# transformers <= 5.17 and compressed-tensors 0.19, which conflict with the project's (transformers 5.25).
#   bash scripts/setup_library_gptq_venv.sh [VENV_DIR]      (default: .venvs/llmcompressor)
# then
#   .venvs/llmcompressor/bin/python scripts/library_gptq.py --model DIR --calibration TOKENS.json \
#       --bits 3 --group-size 32 --output OUT_DIR
# torch==2.13.0 is installed first, on its own: the package index serves a CPU build of it, and an
# unpinned torch pulled in by llmcompressor would bring GBs of CUDA packages. Then llmcompressor, with
# pip resolving transformers / compressed-tensors / datasets / accelerate to what llmcompressor pins.
# Idempotent: when the venv already imports the pinned llmcompressor and torch, nothing is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venvs/llmcompressor}"
PYTHON=${PYTHON:-python3}
TORCH_VERSION=2.13.0
LLMCOMPRESSOR_VERSION=0.14.0.1

complete() {
    [[ -x "$VENV/bin/python" ]] && "$VENV/bin/python" - "$TORCH_VERSION" "$LLMCOMPRESSOR_VERSION" <<'EOF' >/dev/null 2>&1
import sys
from importlib.metadata import version
torch_wanted, llmc_wanted = sys.argv[1:3]
assert version("torch").split("+")[0] == torch_wanted, version("torch")
assert version("llmcompressor") == llmc_wanted, version("llmcompressor")
import compressed_tensors, datasets, llmcompressor, torch, transformers  # noqa: F401  (importable)
EOF
}

if complete; then
    echo "library GPTQ venv complete: $VENV (nothing to do)"
    exit 0
fi

# pip's own warnings about this machine's local extra indexes that lack a package are noise here.
pip_install() {
    "$VENV/bin/python" -m pip install -q "$@" 2> >(grep -v 'is neither a file nor a directory' >&2)
}

[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
pip_install --upgrade pip
pip_install "torch==$TORCH_VERSION"
case "$("$VENV/bin/python" -c 'from importlib.metadata import version; print(version("torch"))')" in
    *+cpu) ;;
    *) echo "warning: torch in $VENV is not a CPU build; the package index served another" >&2 ;;
esac
pip_install "llmcompressor==$LLMCOMPRESSOR_VERSION"
"$VENV/bin/python" -m pip check || true
complete || { echo "library GPTQ venv incomplete after install: $VENV" >&2; exit 1; }
"$VENV/bin/python" - <<'EOF'
from importlib.metadata import version
print("library GPTQ venv ready:", ", ".join(
    f"{name} {version(name)}" for name in ("llmcompressor", "compressed-tensors", "transformers", "torch")))
EOF
