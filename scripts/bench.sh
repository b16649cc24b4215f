#!/usr/bin/env bash
# Sets everything up (scripts/setup_env.sh), then runs the throughput comparison against eager SAM on
# whatever device is present (a GPU if torch sees one, else the CPU). By default a quick run (ResNet-50's
# and a many-small-tensors parameter set, fp32; about a minute on a 2-core CPU); `--full` runs the whole
# sweep (every parameter set and dtype); other arguments go to the optimizer-side benchmark as they are
# (e.g. --sets resnet50 --dtypes float32 bfloat16).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
if [ "${1:-}" = "--full" ]; then
  shift
  .venv/bin/python -m benchmarks.optimizer_step "$@"
elif [ "$#" -eq 0 ]; then
  .venv/bin/python -m benchmarks.optimizer_step --sets resnet50 many_small --dtypes float32 --repeats 5
else
  .venv/bin/python -m benchmarks.optimizer_step "$@"
fi
