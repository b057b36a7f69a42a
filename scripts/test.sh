#!/usr/bin/env bash
# Install everything the tests need on a fresh Debian machine, then run lint, types and the suite.
# Usage: scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."

# Real peers the tests use: Orthanc (PACS), dcmtk (storescu/storescp/echoscu/dsrdump/dcmcjpeg),
# dicom3tools (dciodvfy). Installed when missing and we are root.
need_pkgs=()
command -v Orthanc >/dev/null || need_pkgs+=(orthanc)
command -v storescu >/dev/null || need_pkgs+=(dcmtk)
command -v dciodvfy >/dev/null || need_pkgs+=(dicom3tools)
command -v openssl >/dev/null || need_pkgs+=(openssl)
# perf_analyzer (benchmarks/triton.py) links Debian's libb64.
dpkg-query -W libb64-0d >/dev/null 2>&1 || need_pkgs+=(libb64-0d)  # ldconfig may not be on PATH
# A Devanagari font, so that a Hindi report rendered by dsr2html (or any viewer) shows its text.
dpkg-query -W fonts-lohit-deva >/dev/null 2>&1 || need_pkgs+=(fonts-lohit-deva)
# The browser the status page is tested in (Playwright drives Debian's chromium; it downloads
# no browser of its own).
command -v chromium >/dev/null || need_pkgs+=(chromium)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need_pkgs[@]}"
  else
    echo "missing Debian packages: ${need_pkgs[*]} (run as root, or: sudo apt-get install ${need_pkgs[*]})" >&2
  fi
fi
# The Debian package starts an Orthanc service where an init system runs; tests start their own.

python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
# A real tritonserver for the Triton tests: the wheel's own Python dependencies pin NumPy < 2,
# so it is installed alone; the tests use only its tritonserver build and bundled libraries.
.venv/bin/python -m pip install -q --no-deps 'nvidia-pytriton==0.7.0'
# perf_analyzer for the Triton benchmark, taken out of the tritonclient 2.51.0 wheel once, here at
# install time (never installed: that wheel pins NumPy < 2), so no test downloads anything.
.venv/bin/python -c 'import sys; sys.path.insert(0, "benchmarks"); import triton; triton.perf_analyzer_binary()'

.venv/bin/ruff check .
.venv/bin/mypy core client kernels server pacs_bridge
# One direction through the code: the import-linter contracts in pyproject.toml.
.venv/bin/lint-imports

# A fresh kernel cache: Numba's cache is not invalidated by edits to imported helper modules.
export NUMBA_CACHE_DIR
NUMBA_CACHE_DIR=$(mktemp -d)
trap 'rm -rf "$NUMBA_CACHE_DIR"' EXIT
.venv/bin/python -m pytest "$@"
