"""Test set-up: Triton kernels run on CPU tensors through the Triton interpreter.

NOTE: TRITON_INTERPRET must be set before any module with ``@triton.jit`` is imported, so it is set here,
at collection time, ahead of every test module.

The default run leaves out the tests marked ``slow`` (pyproject.toml's addopts): the rest of the cross
products beyond their covering sets (cases.py), the fuzzing beyond the default run's share of the examples
(fuzz_profile.py), and a few long cases (machine code, ResNet-50, a reproduction script). ``pytest -m
slow`` runs just those, ``pytest -m ""`` everything.
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).parent))  # the shared helpers (tolerance.py, ...) import from anywhere

import pytest
import torch
from targets import KERNELS, OPTIMIZER_BACKENDS, REFERENCE, Target, require


@pytest.fixture(autouse=True)
def single_thread():
    """NOTE: test tensors are tiny; torch's intra-op thread pool only adds overhead there (tens of ms per
    op on a busy two-core machine), so every test runs single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=KERNELS, ids=str)
def kernel(request) -> Target:
    """Each kernel backend on each device of this machine (targets.py; absent ones skip or fail there)."""
    return request.param.require()


@pytest.fixture(params=[*KERNELS, REFERENCE], ids=str)
def any_backend(request) -> Target:
    """Every kernel backend and the torch reference itself (for contracts that hold on their own)."""
    return request.param.require()


@pytest.fixture(params=OPTIMIZER_BACKENDS)
def backend(request) -> str:
    """Optimizer-level tests run on every op backend (targets.py; absent ones skip or fail there)."""
    require(request.param)
    return request.param
