#!/usr/bin/env bash
# Create .venv (once) and install the project into it. Sourced by serve.sh and test.sh.
# FLUX2_TORCH picks the torch requirement (default torch==2.13.0; a CPU wheel of it is preinstalled
# on our CI machines, on a GPU machine pip fetches the CUDA build).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/pip install -q "${FLUX2_TORCH:-torch==2.13.0}"
fi
extras=${1:-}
.venv/bin/pip install -q -e ".${extras}"
