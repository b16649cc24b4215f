#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment in .venv, installs the pinned requirements and
# builds sam_kernels from source in editable mode. Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -r requirements-dev.txt

# The CUDA toolkit's root, for building the native extension's CUDA part (torch guesses it from
# `which nvcc`, which can be a wrapper script outside the toolkit).
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
export MAX_JOBS=${MAX_JOBS:-2}
.venv/bin/python -m pip install --quiet --no-build-isolation --no-deps -e .
.venv/bin/python -m sam_kernels.info
