#!/usr/bin/env bash
# On a machine with an NVIDIA GPU (CUDA 13 driver): install the GPU extras and run the tests that
# need a device. ONNX Runtime's GPU build replaces its CPU build (both own the onnxruntime package).
# Usage: scripts/gpu_check.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test,cuda]'
.venv/bin/python -m pip install -q --no-deps 'nvidia-pytriton==0.7.0'
.venv/bin/python -m pip uninstall -q -y onnxruntime
.venv/bin/python -m pip install -q 'onnxruntime-gpu[cuda,cudnn]==1.31.1'
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
export NUMBA_CACHE_DIR
NUMBA_CACHE_DIR=$(mktemp -d)
.venv/bin/python -m pytest -q -rs tests/test_cuda_kernels.py tests/test_gpu_inference.py "$@"
