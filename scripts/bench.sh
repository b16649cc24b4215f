#!/usr/bin/env bash
# Sets everything up (scripts/setup_env.sh), then compares SAM's optimizer work against eager SAM and
# against torch's fused SGD step on whatever device is present (a GPU if torch sees one, else the CPU).
# By default a quick run (a few minutes on a 2-core CPU): the host cost of an iteration at 161 and 2000
# tensors, then the optimizer step on ResNet-50's and a many-small-tensors parameter set in fp32; it
# ends with one line per set: SAM's ratio to the fused SGD step and to eager SAM, the median over the
# rounds with the min-max. `--full` runs the whole optimizer-step sweep (every parameter set and dtype);
# other arguments go to the optimizer-step benchmark as they are (e.g. --sets resnet50 --dtypes float32).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh

# NOTE (threads): one intra-op thread by default, so that a core taken by other work slows the variants
# of a round alike instead of stalling one of them in an oversubscribed thread pool; SAM_KERNELS_BENCH_THREADS
# changes it.
threads=${SAM_KERNELS_BENCH_THREADS:-1}
summary=$(mktemp)
trap 'rm -f "$summary"' EXIT
if [ "${1:-}" = "--full" ]; then
  shift
  .venv/bin/python -m benchmarks.optimizer_step --threads "$threads" --summary "$summary" "$@"
elif [ "$#" -eq 0 ]; then
  .venv/bin/python -m benchmarks.host_overhead --threads "$threads" --counts 161 2000 --rounds 9 \
    --repeats 20 --summary "$summary"
  # NOTE (rounds): eager SAM's step time alternates from one step to the next (about 70 and 90 ms on
  # ResNet-50's shapes: the backups it clones every step land on reused or on fresh memory), so with 7
  # rounds its ratio moved by 1.45x between two consecutive runs; 21 rounds (a few seconds more) kept
  # three runs within 1.15x.
  .venv/bin/python -m benchmarks.optimizer_step --threads "$threads" --sets resnet50 many_small \
    --dtypes float32 --repeats 21 --summary "$summary"
else
  .venv/bin/python -m benchmarks.optimizer_step --threads "$threads" --summary "$summary" "$@"
fi
echo
echo "summary ($threads thread(s); ratios within this run, median over the rounds with the min-max):"
cat "$summary"
