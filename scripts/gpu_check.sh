#!/usr/bin/env bash
# The GPU check in one command, for a machine with a CUDA GPU, nvcc and its own torch and Triton, with
# nothing to install (no package registry needed): it builds sam_kernels._C in place against that torch
# (CPU and CUDA parts), then runs each step under its own time limit and writes what it prints under
# OUT_DIR (the first argument; default build/gpu_check), eight files in all:
#   build.txt          the versions found and the extension's build;
#   selftest.txt/.json python -m sam_kernels.selftest: every backend against the reference, the CUDA-graph
#                      replay, the fused ops' bandwidth and the host cost of an iteration;
#   tests.txt          the native, Triton, capturable and benchmark tests on the GPU (not the slow set);
#   host.txt/.json     benchmarks.host_overhead: host and device time of an iteration at 161 and 2000
#                      tensors, the CUDA-graph replay among the rows;
#   step.txt, optimizer_step_<device>.json
#                      benchmarks.optimizer_step on ResNet-50 and ViT-B/16 shapes, fp32 and bf16.
# The time limits add up to 9 minutes. Exit status: the number of steps that failed (0: all passed).
# On a machine without a GPU it runs the same steps on the CPU (the GPU checks are skipped).
#
#   bash scripts/gpu_check.sh [OUT_DIR]
set -u -o pipefail
cd "$(dirname "$0")/.."
out=${1:-build/gpu_check}
mkdir -p "$out"
rm -f "$out"/*.txt
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
if [ "$gpu" = 1 ]; then
  # The CUDA tests must run here: a missing CUDA build fails them instead of skipping them.
  export SAM_KERNELS_EXPECT_CUDA=1 SAM_KERNELS_FORCE_CUDA=1
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$("$python" -c \
    "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}
fi
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} MAX_JOBS=${MAX_JOBS:-$(nproc)}
"$python" -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, \
'triton', triton.__version__, 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)" \
  | tee "$out/build.txt"

step build 150 "$python" setup.py build_ext --inplace
step selftest 120 "$python" -m sam_kernels.selftest --json "$out/selftest.json"
step tests 150 "$python" -m pytest -q -m "not slow" -p no:cacheprovider \
  python_tests/backends/test_native.py python_tests/backends/test_triton.py \
  python_tests/torch_features/test_capturable.py python_tests/test_benchmarks.py
step host 60 "$python" -m benchmarks.host_overhead --counts 161 2000 --rounds 5 --repeats 20 \
  --json "$out/host.json"
step step 60 "$python" -m benchmarks.optimizer_step --sets resnet50 vit_b16 --dtypes float32 bfloat16 \
  --repeats 7 --out "$out"
echo "gpu_check: $failed step(s) failed; outputs in $out"
exit "$failed"
