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


def _optimizer_backends() -> list[str]:
    """The torch reference, the Triton kernels (interpreter on CPU) and, when it is built, the native
    extension (the backend ``auto`` picks in practice)."""
    from sam_kernels.backends import native_status

    return ["torch", "triton"] + (["native"] if native_status("cpu")[0] else [])


@pytest.fixture(params=_optimizer_backends())
def backend(request) -> str:
    """Optimizer-level tests run on every backend present (the triton one must be)."""
    if request.param == "triton":
        from sam_kernels.backends import triton_status

        available, why = triton_status("cpu")
        if not available:
            pytest.fail(f"the triton backend must run in the tests: {why}")
    return request.param
