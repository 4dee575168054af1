#!/bin/sh
# The GPU day, unattended and under ten minutes: benchmarks/gpu.py's training (gpt2-124m, bf16),
# generation and serving benchmarks on CUDA, one JSON line each on stdout.
#   benchmarks/gpu.sh          on a GPU machine (after `make install` with a CUDA build of torch)
#   benchmarks/gpu.sh --cpu    the same plan shrunk to the micro preset on a CPU: it is known to run
set -eu
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
[ -x "$PY" ] || make install >&2
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
exec "$PY" benchmarks/gpu.py "$@"
