#!/usr/bin/env bash
# Every GPU check of the project in one call, for a lent GPU machine with a time limit (DEVELOPERS.md):
# the CUDA-only tests, then bench/gpu.py (issue 7's table), then bench/train.py's GPU rows (issues 9 and 12).
# Each part has its own time limit, so one that hangs or runs long leaves time for the next.
#
#     bash bench/gpu_session.sh [OUTPUT_DIR]      # ~9 minutes on an H200; logs and tables go to OUTPUT_DIR
#
# Packages the machine lacks (diffusers, gguf, bitsandbytes) are installed from wheels in .whl/ when present.
set -u
python=${PYTHON:-python3}
out="${1:-${OUT:-/tmp/flux2-gpu}}"
mkdir -p "$out"
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

part() {  # part NAME SECONDS COMMAND...: run with a limit, keep its log, say how it ended
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit} s) $(date -u +%T)"
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    echo "=== $name: exit $rc $(date -u +%T)"
}

nvidia-smi -L
"$python" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
part cuda-tests 60 "$python" -m pytest -q -p no:cacheprovider -k "gpu or cuda" \
    tests/test_fp8_matmul.py tests/test_streaming.py tests/test_train_swap_check.py
tail -n 5 "$out/cuda-tests.log"
part gpu-bench 320 "$python" bench/gpu.py --minutes 4.0
sed -n '/^section /,$p' "$out/gpu-bench.log"
part train-bench 170 "$python" bench/train.py --steps 3 --warmup 1 --minutes 2.0
grep '^|' "$out/train-bench.log"
