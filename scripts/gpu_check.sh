#!/usr/bin/env bash
# On a machine with an NVIDIA GPU (CUDA 13 driver): install the GPU extras, run the tests that
# need a device, then the preprocessing and inference benchmarks. Each step's output goes to
# $OUT (default ./gpu-results) as well as the terminal. ONNX Runtime's GPU build replaces its CPU
# build (both own the onnxruntime package).
# Usage: scripts/gpu_check.sh [pytest args...]     (NIDAAN_GPU_BENCH=0 skips the benchmarks)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-results}"
mkdir -p "$out"
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test,cuda,bench]'
.venv/bin/python -m pip install -q --no-deps 'nvidia-pytriton==0.7.0'
.venv/bin/python -m pip uninstall -q -y onnxruntime
.venv/bin/python -m pip install -q 'onnxruntime-gpu[cuda,cudnn]==1.31.1'
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$out/device.txt"
export NUMBA_CACHE_DIR
NUMBA_CACHE_DIR=$(mktemp -d)
status=0
.venv/bin/python -m pytest -q -rs -s tests/test_cuda_kernels.py tests/test_gpu_inference.py "$@" \
  2>&1 | tee "$out/tests.txt" || status=1
if [ "${NIDAAN_GPU_BENCH:-1}" != 0 ]; then
  .venv/bin/python benchmarks/preprocess.py 2>&1 | tee "$out/preprocess.txt" || status=1
  .venv/bin/python benchmarks/inference.py --model cxr_screen --batch 32 2>&1 \
    | tee "$out/inference.txt" || status=1
fi
exit $status
