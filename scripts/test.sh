#!/usr/bin/env bash
# Install the test extras and the browser (Debian's chromium), then run the whole suite.
# .venv-upscale (spandrel, for tests/test_upscale_spandrel.py) is built by that test, through
# scripts/upscale_venv.sh, the first time it runs.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/scripts/venv.sh" "[host,test]"
if [ ! -x /usr/bin/chromium ]; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
            || echo "warning: could not install chromium; browser tests will fail" >&2
    fi
fi
if ! command -v redis-server >/dev/null 2>&1; then  # the scale-out tests start a real one on loopback
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null) \
            || echo "warning: could not install redis-server; the Redis worker tests will fail" >&2
    fi
fi
cd "$root"
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
