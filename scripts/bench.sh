#!/usr/bin/env bash
# Sets everything up (scripts/setup_env.sh), then runs the throughput comparison against eager SAM on
# whatever device is present (a GPU if torch sees one, else the CPU). Extra arguments go to the
# optimizer-side benchmark (e.g. --sets resnet50 --dtypes float32).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/python -m benchmarks.optimizer_step "$@"
