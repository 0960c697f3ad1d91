#!/usr/bin/env bash
# Main job: install, then start the canvas server on 127.0.0.1:8188. Without real FLUX.2 weights in
# ./models, tiny demo models are generated there first. Extra arguments go to `flux2 serve`.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/scripts/venv.sh" "[host]"
cd "$root"
exec .venv/bin/flux2 serve --demo-models "$@"
