"""pytest-benchmark entry point of the host-cost benchmark (the CLI is ``benchmarks.host_overhead``).

    pytest benchmarks/bench_host_overhead.py --benchmark-enable [--benchmark-columns=median]

Every variant of ``host_overhead.variants`` is timed on 161 and on 2000 one-element parameters (the
kernels do no work, so the time is the host's), on the device the CLI would use.
"""

import pytest
import torch

from benchmarks import host_overhead

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
VARIANTS = host_overhead.variants(DEVICE)


@pytest.mark.parametrize("count", [161, 2000])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_host_overhead(benchmark, name, count):
    variant = VARIANTS[name](host_overhead.make_params(count, DEVICE))
    benchmark.pedantic(variant.step, rounds=20, iterations=5, warmup_rounds=3)
