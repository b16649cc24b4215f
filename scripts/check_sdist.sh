#!/usr/bin/env bash
# Checks the source distribution end to end, the way a user installs it: builds the sdist
# (`python -m build --no-isolation --sdist`), checks that it carries the build's files (csrc/ with its
# headers, CMakeLists.txt, LICENSE, ...: python_tests/test_packaging.py), installs it with
# `pip install --no-build-isolation --no-deps --target <empty dir>` (pip builds a wheel from the archive,
# compiling the extension's CPU part against the installed torch), then, in a fresh process outside the
# source tree, imports sam_kernels from that directory, runs one SAM step on the native CPU backend against
# the torch backend and prints the version. Exits non-zero on any failure; each phase's time is printed.
# The compile dominates: about 1.5 min of CPU time (2 jobs; longer on a busy machine).
#
#   bash scripts/check_sdist.sh          # with .venv/bin/python; PYTHON=... picks another interpreter
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-$ROOT/.venv/bin/python}

# The CPU part only, whatever the caller's environment asks for: no CUDA compile.
unset SAM_KERNELS_FORCE_CUDA SAM_KERNELS_SKIP_EXT TORCH_CUDA_ARCH_LIST SAM_KERNELS_BACKEND PYTHONPATH
export SAM_KERNELS_NO_CUDA=1 MAX_JOBS=${MAX_JOBS:-2}

work=$(mktemp -d "${TMPDIR:-/tmp}/sam_kernels_sdist.XXXXXX")
had_egg_info=$([ -e sam_kernels.egg-info ] && echo 1 || echo 0)
cleanup() {
  rm -rf "$work"
  # the sdist build writes sam_kernels.egg-info/ into the tree; leave the tree as it was found
  if [ "$had_egg_info" = 0 ]; then rm -rf "$ROOT/sam_kernels.egg-info"; fi
}
trap cleanup EXIT

# Runs a phase quietly, printing its log only when it fails, and its time.
phase() {
  local name=$1 began=$SECONDS
  shift
  if ! "$@" > "$work/$name.log" 2>&1; then
    cat "$work/$name.log" >&2
    echo "check_sdist: FAILED: $name" >&2
    exit 1
  fi
  echo "check_sdist: $name ok ($((SECONDS - began)) s)"
}

phase sdist "$PY" -m build --no-isolation --sdist --outdir "$work/dist" .
sdist=$(echo "$work"/dist/sam_kernels-*.tar.gz)
phase contents "$PY" python_tests/test_packaging.py "$sdist"
tar tzf "$sdist" | grep -E '/(CMakeLists\.txt|LICENSE|csrc/include/.*\.h)$' | sed 's/^/  /'

mkdir "$work/site"
phase install "$PY" -m pip install --no-build-isolation --no-deps --no-cache-dir --target "$work/site" "$sdist"
ls "$work"/site/sam_kernels/_C*.so "$work"/site/sam_kernels-*.dist-info/licenses/LICENSE | sed 's/^/  /'

# A fresh process in an empty directory, so neither the source tree nor the editable install is what
# gets imported.
mkdir "$work/run"
cd "$work/run"
export PYTHONPATH=$work/site SAMK_TARGET=$work/site
phase step "$PY" - <<'EOF'
import os

import torch

import sam_kernels
from sam_kernels.backends import native_backend

target = os.environ["SAMK_TARGET"] + os.sep
assert sam_kernels.__file__.startswith(target), f"imported from {sam_kernels.__file__}, not {target}"
info = native_backend.build_info()
assert info["built"], info["error"]
assert info["path"].startswith(target), f"extension loaded from {info['path']}"
assert info["build_tool"] == "setuptools" and not info["cuda"], info


def sam_step(backend):
    """The weights before and after one SAM step (SGD with momentum) of a small seeded MLP."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = sam_kernels.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9,
                                backend=backend)
    x, y = torch.randn(32, 8), torch.randn(32, 2)
    loss_fn = torch.nn.MSELoss()
    loss_fn(model(x), y).backward()
    optimizer.first_step(zero_grad=True)
    loss_fn(model(x), y).backward()
    optimizer.second_step(zero_grad=True)
    return before, [p.detach() for p in model.parameters()]


before, native = sam_step("native")
_, reference = sam_step("torch")
assert not any(torch.equal(a, b) for a, b in zip(native, before)), "the step left weights unchanged"
for a, b in zip(native, reference):
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
print(f"sam_kernels {sam_kernels.__version__}: one SAM step on the native CPU backend matches the torch "
      f"backend ({info['path']})")
EOF
cat "$work/step.log"
SAM_KERNELS_BACKEND=native "$PY" -m sam_kernels.info
echo "check_sdist: all ok ($SECONDS s)"
