#!/usr/bin/env bash
# The GPU benchmarks, in under 8 minutes on one GPU: precompute and training at 256 px with
# the `base` presets (bf16 vs fp32, MFU), FSDP vs DDP per-rank state, then serving on the GPU.
# Run from the repository root after `make install` (or `make run`): bash benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 300 "$PYTHON" benchmarks/gpu.py "$@"
timeout 180 "$PYTHON" benchmarks/serve.py --replica-gpus 1 --replica-cpus 4 --requests 96 --batch-wait 0.01 --http-only
