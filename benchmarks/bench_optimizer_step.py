"""pytest-benchmark entry point of the optimizer-side benchmark (the CLI is ``benchmarks.optimizer_step``).

    pytest benchmarks/bench_optimizer_step.py --benchmark-enable [--benchmark-columns=median]

``SAM_KERNELS_BENCH_SET`` (default ``resnet50``) and ``SAM_KERNELS_BENCH_DTYPE`` (default ``float32``)
choose the parameter set and dtype; every variant of ``optimizer_step.make_variants`` is timed on the
device the CLI would use.
"""

import os

import pytest
import torch

from benchmarks import optimizer_step
from benchmarks.shapes import PARAM_SETS

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPES = PARAM_SETS[os.environ.get("SAM_KERNELS_BENCH_SET", "resnet50")]()
DTYPE = optimizer_step.DTYPES[os.environ.get("SAM_KERNELS_BENCH_DTYPE", "float32")]


def fresh_params():
    return optimizer_step.make_params(SHAPES, DTYPE, DEVICE)


VARIANTS = optimizer_step.make_variants(fresh_params, DEVICE)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_optimizer_step(benchmark, name):
    variant = VARIANTS[name]()

    def step():
        variant.step()
        optimizer_step.synchronize(DEVICE)

    benchmark.pedantic(step, rounds=5, warmup_rounds=2)
