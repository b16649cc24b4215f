#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment in .venv, installs the pinned requirements and
# builds sam_kernels from source in editable mode. Safe to run again: the requirements are installed and
# the extension rebuilt only when their inputs changed (a stamp in .venv records what was done).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi

# The CUDA toolkit's root, for building the native extension's CUDA part (torch guesses it from
# `which nvcc`, which can be a wrapper script outside the toolkit).
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
export MAX_JOBS=${MAX_JOBS:-2}

# NOTE (stamps): a hash of everything an install or a build reads: the pinned requirements; the build
# files, the C++/CUDA sources and the build's environment variables.
stamp() { sha256sum "$@" | sha256sum | cut -c1-16; }
requirements_stamp=$(stamp requirements-dev.txt)
build_inputs=$(find csrc -type f | sort)
build_stamp=$(
  { stamp setup.py CMakeLists.txt pyproject.toml $build_inputs
    env | grep -E '^(SAM_KERNELS_|TORCH_CUDA_ARCH_LIST=|CUDA_HOME=)' | sort; } | sha256sum | cut -c1-16)

if [ "$(cat .venv/.requirements_stamp 2>/dev/null)" != "$requirements_stamp" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -r requirements-dev.txt
  echo "$requirements_stamp" > .venv/.requirements_stamp
  rm -f .venv/.build_stamp  # the extension compiles against the installed torch
fi
if [ "$(cat .venv/.build_stamp 2>/dev/null)" != "$build_stamp" ] \
    || ! .venv/bin/python -c "import sam_kernels" 2>/dev/null; then
  .venv/bin/python -m pip install --quiet --no-build-isolation --no-deps -e .
  echo "$build_stamp" > .venv/.build_stamp
else
  echo "setup_env: requirements and build up to date (inputs unchanged), nothing to install"
fi
.venv/bin/python -m sam_kernels.info
