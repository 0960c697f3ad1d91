#!/usr/bin/env bash
# Create .venv (once) and install the project into it. Called by serve.sh and test.sh with the extras to
# install ("[host]", "[host,test]").
# FLUX2_TORCH picks the torch requirement (default torch==2.13.0; a CPU wheel of it is preinstalled
# on our CI machines, on a GPU machine pip fetches the CUDA build).
# The editable install picks up code changes by itself, so pip runs again only when pyproject.toml or the
# extras change: a stamp in .venv per set of extras holds the hash of the pyproject.toml installed with it.
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
stamp=".venv/.flux2-installed${extras}"
wanted=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
    .venv/bin/pip install -q -e ".${extras}"
    echo "$wanted" > "$stamp"
fi
