#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment in .venv, installs the pinned requirements and
# builds sam_kernels from source in editable mode. Safe to run again: the requirements are installed and
# the extension rebuilt only when their inputs changed (a stamp in .venv records what was done).
# VENV_DIR and REQUIREMENTS_FILE pick another environment and pin list (scripts/test_compat.sh: the
# oldest supported torch and Triton in build/compat/.venv, from requirements-compat.txt).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV_DIR=${VENV_DIR:-.venv}
REQUIREMENTS_FILE=${REQUIREMENTS_FILE:-requirements-dev.txt}
if [ ! -x "$VENV_DIR/bin/python" ]; then
  "$PYTHON" -m venv "$VENV_DIR"
fi

# The CUDA toolkit's root, for building the native extension's CUDA part (torch guesses it from
# `which nvcc`, which can be a wrapper script outside the toolkit).
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
export MAX_JOBS=${MAX_JOBS:-2}

# NOTE (stamps): a hash of everything an install or a build reads: the pinned requirements; the build
# files, the C++/CUDA sources and the environment variables setup.py reads. Only those: the tests'
# SAM_KERNELS_EXPECT_* switches do not change the build and must not trigger a rebuild (in CI they are
# set after the first set-up, and a rebuild of the CPU and CUDA parts takes minutes).
stamp() { sha256sum "$@" | sha256sum | cut -c1-16; }
requirements_stamp=$(stamp "$REQUIREMENTS_FILE")
build_inputs=$(find csrc -type f | sort)
build_stamp=$(
  { stamp setup.py CMakeLists.txt pyproject.toml $build_inputs
    env | grep -E '^(SAM_KERNELS_(NO_CUDA|SKIP_EXT|FORCE_CUDA)=|TORCH_CUDA_ARCH_LIST=|CUDA_HOME=)' | sort; } | sha256sum | cut -c1-16)

if [ "$(cat "$VENV_DIR"/.requirements_stamp 2>/dev/null)" != "$requirements_stamp" ]; then
  "$VENV_DIR"/bin/python -m pip install --quiet --upgrade pip
  "$VENV_DIR"/bin/python -m pip install --quiet -r "$REQUIREMENTS_FILE"
  echo "$requirements_stamp" > "$VENV_DIR"/.requirements_stamp
  rm -f "$VENV_DIR"/.build_stamp  # the extension compiles against the installed torch
fi
if [ "$(cat "$VENV_DIR"/.build_stamp 2>/dev/null)" != "$build_stamp" ] \
    || ! "$VENV_DIR"/bin/python -c "import sam_kernels" 2>/dev/null; then
  "$VENV_DIR"/bin/python -m pip install --quiet --no-build-isolation --no-deps -e .
  echo "$build_stamp" > "$VENV_DIR"/.build_stamp
else
  echo "setup_env: requirements and build up to date (inputs unchanged), nothing to install"
fi
"$VENV_DIR"/bin/python -m sam_kernels.info
