"""Test set-up: Triton kernels run on CPU tensors through the Triton interpreter.

NOTE: TRITON_INTERPRET must be set before any module with ``@triton.jit`` is imported, so it is set here,
at collection time, ahead of every test module.
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).parent))  # the shared helpers (tolerance.py) import from anywhere

import pytest
import torch


@pytest.fixture(autouse=True)
def single_thread():
    """NOTE: test tensors are tiny; torch's intra-op thread pool only adds overhead there (tens of ms per
    op on a busy two-core machine), so every test runs single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=["torch", "triton"])
def backend(request) -> str:
    """Optimizer-level tests run on the torch reference and on the Triton kernels (interpreter on CPU)."""
    if request.param == "triton":
        from sam_kernels.backends import triton_status

        available, why = triton_status("cpu")
        if not available:
            pytest.fail(f"the triton backend must run in the tests: {why}")
    return request.param
