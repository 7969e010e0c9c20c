#!/usr/bin/env bash
# On the GPU machine (device tool, carry [".device"]): unpack what `python -m bench.gpu pack` wrote and run
# the four benchmarks at base size on CUDA. Extra arguments go to `python -m bench.gpu run`.
set -euo pipefail
cd "$(dirname "$0")/.."
test -f .device/site.tgz || { echo "no .device/site.tgz: run 'make bench-gpu' (or python -m bench.gpu pack) first" >&2; exit 2; }
test -d .device/site || tar xzf .device/site.tgz -C .device
export PYTHONPATH="$PWD/.device/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec python3 -m bench.gpu run "$@"
