"""Shared fixtures of the optimizer tests."""

import pytest
import torch

from sam_kernels.backends import triton_status


@pytest.fixture(params=["torch", "triton"])
def backend(request) -> str:
    """Every optimizer test runs on the torch reference and on the Triton kernels (interpreter on CPU)."""
    if request.param == "triton":
        available, why = triton_status("cpu")
        if not available:
            pytest.skip(f"triton backend unavailable: {why}")
    return request.param


@pytest.fixture(autouse=True)
def single_thread():
    """NOTE: the test models are tiny; torch's intra-op thread pool only adds overhead there (tens of ms
    per BatchNorm call on a busy two-core machine), so these tests run single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
