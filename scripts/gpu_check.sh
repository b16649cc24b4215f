#!/usr/bin/env bash
# The GPU check in one command, for a machine with a CUDA GPU, nvcc and its own torch and Triton, offline
# (nothing is installed): it builds sam_kernels._C in place against that torch (CPU and CUDA parts, for
# sm_80 and sm_90 as the tests require), then runs each step under its own time limit and writes what it
# prints under OUT_DIR (the first argument; default build/gpu_check), eight files in all:
#   build.txt          the versions found and the extension's build;
#   selftest.txt/.json python -m sam_kernels.selftest --quick: every backend against the reference (Triton
#                      compiled for the GPU), the CUDA-graph replay, the fused ops' bandwidth and the host
#                      cost of an iteration;
#   tests.txt          the tests that use the GPU (not the slow set), in two runs: with Triton in its
#                      interpreter (conftest.py's default) for the native CUDA ops and everything on the
#                      CPU, then with Triton compiled (TRITON_INTERPRET=0) for the Triton-on-CUDA cases;
#   host.txt/.json     benchmarks.host_overhead: host and device time of an iteration at 161 and 2000
#                      tensors, the CUDA-graph replay among the rows;
#   step.txt, optimizer_step_<device>.json
#                      benchmarks.optimizer_step on ResNet-50 and ViT-B/16 shapes, fp32 and bf16.
# The time limits add up to 9 minutes. Exit status: the number of steps that failed (0: all passed).
# On a machine without a GPU it runs the same steps on the CPU, the GPU checks skipped (there the
# optimizer step, sized for a GPU, can outrun its limit).
#
#   bash scripts/gpu_check.sh [OUT_DIR]
set -u -o pipefail
cd "$(dirname "$0")/.."
out=${1:-build/gpu_check}
mkdir -p "$out"
rm -f "$out"/*.txt "$out"/*.json
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
failed=0

# step NAME SECONDS COMMAND...: runs COMMAND with its output in $out/NAME.txt (and on the terminal).
step() {
  local name=$1 seconds=$2
  shift 2
  echo "== $name (at most ${seconds}s): $*"
  local start=$SECONDS
  timeout "$seconds" "$@" 2>&1 | tee -a "$out/$name.txt"
  local status=${PIPESTATUS[0]}
  echo "== $name: exit status $status after $((SECONDS - start))s" | tee -a "$out/$name.txt"
  [ "$status" -eq 0 ] || failed=$((failed + 1))
}

gpu=$("$python" -c "import torch; print(int(torch.cuda.is_available()))")
# The native tests must run: a missing build fails them instead of skipping them (and with a GPU, a
# missing CUDA part; the tests then also require sm_80 and sm_90 code, setup.py's default architectures).
export SAM_KERNELS_EXPECT_NATIVE=1
if [ "$gpu" = 1 ]; then
  export SAM_KERNELS_EXPECT_CUDA=1 SAM_KERNELS_FORCE_CUDA=1
fi
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} MAX_JOBS=${MAX_JOBS:-$(nproc)}
"$python" -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, \
'triton', triton.__version__, 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)" \
  | tee "$out/build.txt"

# The tests of the ops on every backend and device, the native and CUDA-graph ones and the benchmarks'.
gpu_tests() {
  local tests=(python_tests/test_ops.py python_tests/test_noise.py python_tests/backends/test_native.py
               python_tests/torch_features/test_capturable.py python_tests/test_benchmarks.py)
  local pytest=("$python" -m pytest -q -m "not slow" -p no:cacheprovider -o "addopts=-ra --import-mode=importlib")
  local status=0
  "${pytest[@]}" -k "not triton-cuda and not (cuda_graph and triton)" "${tests[@]}" || status=1
  if [ "$gpu" = 1 ]; then
    TRITON_INTERPRET=0 "${pytest[@]}" -k "triton-cuda or (cuda_graph and triton)" "${tests[@]}" || status=1
  fi
  return "$status"
}
export -f gpu_tests
export python gpu

step build 120 "$python" setup.py build_ext --inplace
step selftest 90 "$python" -m sam_kernels.selftest --quick --json "$out/selftest.json"
step tests 180 bash -c gpu_tests
step host 60 "$python" -m benchmarks.host_overhead --counts 161 2000 --rounds 5 --repeats 20 \
  --json "$out/host.json"
step step 90 "$python" -m benchmarks.optimizer_step --sets resnet50 vit_b16 --dtypes float32 bfloat16 \
  --repeats 7 --out "$out"
echo "gpu_check: $failed step(s) failed; outputs in $out"
exit "$failed"
