#!/usr/bin/env bash
# Tests the committed tree on the oldest supported pair, torch 2.11.0 with Triton 3.6.0
# (requirements-compat.txt), the pair of the GPU machines. Everything lives in build/compat (ignored):
#   src/   a clean copy of the committed tree (a clone of this repository, moved to the commit on each
#          run; its build outputs are kept, so an unchanged csrc/ compiles nothing);
#   .venv/ the environment, made and kept by scripts/setup_env.sh (VENV_DIR, REQUIREMENTS_FILE): it
#          installs again only when requirements-compat.txt changed, and rebuilds the extension only when
#          its inputs did.
# The extension is built there for the CPU and for sm_90 (COMPAT_CUDA_ARCH_LIST; the CUDA part required,
# as in CI); this checkout's own build is not touched. The Triton kernels run in the interpreter
# (TRITON_INTERPRET=1) on CPU tensors, and test_triton.py compiles them for sm_80 and sm_90 ahead of time.
#
#   bash scripts/test_compat.sh [PYTEST ARGS...]
#
# COMPAT_DIR: another place than build/compat (an absolute path). COMPAT_REF: the commit to test
# (default HEAD). COMPAT_TESTS: what pytest runs (default: the ops and the noise op, the optimizers but for their
# fuzzing, the Triton and native backends and the self-check; "python_tests" for the whole suite).
# Then `python -m sam_kernels.selftest --quick` runs in the copy (COMPAT_SELFTEST: "full" for the whole
# self-check, 0 for none).
set -euo pipefail

DEFAULT_TESTS="python_tests/test_ops.py python_tests/test_noise.py python_tests/optim
--ignore=python_tests/optim/test_fuzz_optim.py python_tests/backends/test_triton.py
python_tests/backends/test_native.py python_tests/test_selftest.py"

# NOTE: one function, read whole before it runs, so that editing this file while the tests run (minutes)
# cannot change the rest of that run.
main() {
  cd "$(dirname "$0")/.."
  local root=$PWD started=$SECONDS
  local compat=${COMPAT_DIR:-$root/build/compat}
  local src=$compat/src python=$compat/.venv/bin/python

  local commit
  commit=$(git rev-parse --verify "${COMPAT_REF:-HEAD}^{commit}")
  if [ ! -d "$src/.git" ]; then
    rm -rf "$src"
    git clone --quiet --no-checkout "$root" "$src"
  fi
  git -C "$src" fetch --quiet "$root" "$commit" 2>/dev/null || git -C "$src" fetch --quiet "$root"
  git -C "$src" -c advice.detachedHead=false checkout --quiet --force "$commit"
  # NOTE: the extension's build outputs stay (ninja then recompiles only what changed); anything else
  # that is not in the commit goes.
  git -C "$src" clean -fdxq -e /build/ -e '/sam_kernels/*.so' -e '*.egg-info/'
  echo "test_compat: $commit in $src"

  # NOTE: the architectures are this script's own (COMPAT_CUDA_ARCH_LIST), not a TORCH_CUDA_ARCH_LIST
  # that the caller exported for its own build.
  export SAM_KERNELS_FORCE_CUDA=${SAM_KERNELS_FORCE_CUDA:-1}
  export TORCH_CUDA_ARCH_LIST=${COMPAT_CUDA_ARCH_LIST:-9.0} CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
  VENV_DIR=$compat/.venv REQUIREMENTS_FILE=requirements-compat.txt bash "$src/scripts/setup_env.sh"
  echo "test_compat: set up in $((SECONDS - started)) s"

  cd "$src"
  # The extension must be there, built by setuptools (SAM_KERNELS_EXPECT_CUDA would ask for sm_80 too).
  export TRITON_INTERPRET=1 SAM_KERNELS_EXPECT_NATIVE=1 SAM_KERNELS_EXPECT_BUILD_TOOL=setuptools
  unset SAM_KERNELS_EXPECT_CUDA
  local tests status
  read -r -d '' -a tests <<< "${COMPAT_TESTS:-$DEFAULT_TESTS}" || true
  set +e
  "$python" -m pytest -q -p no:cacheprovider "${tests[@]}" "$@"
  status=$?
  set -e
  if [ "$status" -eq 5 ]; then
    echo "test_compat: pytest collected no tests: the set-up is broken" >&2
    exit 1
  fi
  if [ "$status" -ne 0 ]; then
    echo "test_compat: the tests failed on $("$python" -c 'import torch, triton
print(f"torch {torch.__version__}, Triton {triton.__version__}")')" >&2
    exit "$status"
  fi
  # The self-check's lines here, its JSON record in build/compat/selftest.json.
  local selftest_size=${COMPAT_SELFTEST:-quick}
  if [ "$selftest_size" != 0 ]; then
    "$python" -m sam_kernels.selftest $([ "$selftest_size" = full ] || echo --quick) \
      --json "$compat/selftest.json" | grep -E '^(PASS|FAIL|SKIP) '
  fi
  echo "test_compat: passed in $((SECONDS - started)) s"
}

main "$@"
