#!/usr/bin/env bash
# Sets everything up (scripts/setup_env.sh) and runs the test suite on whatever device is present.
# Triton kernels run on CPU tensors through the Triton interpreter; GPU-only tests skip without a GPU.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh

export TRITON_INTERPRET=1
set +e
.venv/bin/python -m pytest python_tests "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: the set-up is broken" >&2
  exit 1
fi
exit "$status"
