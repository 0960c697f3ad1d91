#!/usr/bin/env bash
# Create .venv-upscale (once) for the upscale-model nodes (UpscaleModelLoader, ImageUpscaleWithModel): spandrel
# needs torchvision, and no torchvision wheel loads against the CPU torch 2.13 of .venv, so this second venv
# holds the CUDA build of torch (it runs on the CPU too) with its matching torchvision, spandrel and the project.
# FLUX2_UPSCALE_TORCH overrides the torch and torchvision requirements (default torch==2.14.1 torchvision==0.29.1,
# the pair our CI machines hold on local disk). Like venv.sh, pip runs again only when pyproject.toml changes
# (a stamp in .venv-upscale holds its hash); a re-run with nothing to do is a no-op.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
venv=.venv-upscale
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -c "import torchvision" 2>/dev/null; then
    # shellcheck disable=SC2086  # the override is a list of requirements
    "$venv/bin/pip" install -q ${FLUX2_UPSCALE_TORCH:-torch==2.14.1 torchvision==0.29.1}
fi
stamp="$venv/.flux2-installed[host,upscale]"
wanted=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
    "$venv/bin/pip" install -q -e ".[host,upscale]"
    echo "$wanted" > "$stamp"
fi
