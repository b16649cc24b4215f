"""The backends under test, listed in one place, and the one meaning of the SAM_KERNELS_EXPECT_* variables.

A target is an op backend on a device. ``KERNELS`` holds the kernel backends on the devices of this
machine: Triton (under the interpreter) and native on the CPU, and with a GPU native CUDA and Triton too.
``OPTIMIZER_BACKENDS`` names the backends the optimizer tests run on: the torch reference, Triton and
native, on the CPU. Every test module parametrizes over these lists (the conftest.py fixtures ``kernel``,
``any_backend`` and ``backend``) and calls ``require`` before it uses a target, so a target that cannot run
here is treated alike everywhere:

* Triton on the CPU must run (the tests set TRITON_INTERPRET=1): a missing one fails.
* The native extension skips with the reason when it is not built, unless ``SAM_KERNELS_EXPECT_NATIVE=1``,
  which turns that into a failure (CI sets it after building).
* Its CUDA part (on a machine with a GPU; the SASS checks everywhere) skips when it is missing, unless
  ``SAM_KERNELS_EXPECT_CUDA=1``, which turns that into a failure and requires sm_80 and sm_90.
* ``SAM_KERNELS_EXPECT_BUILD_TOOL=setuptools`` (or ``cmake``) requires the extension to come from that build.

Triton on a GPU runs wherever a GPU is present; no variable concerns it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

from sam_kernels.backends import native_status, triton_backend, triton_status

EXPECT_NATIVE = os.environ.get("SAM_KERNELS_EXPECT_NATIVE") == "1"
EXPECT_CUDA = os.environ.get("SAM_KERNELS_EXPECT_CUDA") == "1"
EXPECT_BUILD_TOOL = os.environ.get("SAM_KERNELS_EXPECT_BUILD_TOOL", "")

#: Elements per work item of the native kernels: csrc/include/sam_kernels/elementwise.h, kChunkSize
#: (backends/test_native.py checks it against the build).
NATIVE_CHUNK = 65536


def require(backend: str, device_type: str = "cpu") -> torch.device:
    """The device of ``backend`` on ``device_type``; skips or fails the test (the rules above) when the
    backend cannot run there."""
    if device_type == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if backend == "torch":
        return torch.device(device_type)
    available, why = (native_status if backend == "native" else triton_status)(device_type)
    if not available:
        expected = {("triton", "cpu"): "the Triton interpreter",
                    ("native", "cpu"): "SAM_KERNELS_EXPECT_NATIVE=1" if EXPECT_NATIVE else None,
                    ("native", "cuda"): "SAM_KERNELS_EXPECT_CUDA=1" if EXPECT_CUDA else None}
        if expected.get((backend, device_type)):
            pytest.fail(f"{expected[(backend, device_type)]} must run in the tests, but {why}")
        pytest.skip(why)
    return torch.device(device_type)


@dataclass(frozen=True)
class Target:
    """A backend on a device type."""

    backend: str
    device_type: str
    #: Elements per work item of the backend (the multi-chunk cases straddle a chunk boundary).
    chunk: int
    #: Whether results equal the torch reference bit for bit (the native CPU kernels compute in the
    #: reference's operation order without FMA contraction; the interpreter's vectorized math and GPU
    #: code do not).
    exact: bool

    @property
    def device(self) -> torch.device:
        return torch.device(self.device_type)

    def require(self) -> Target:
        require(self.backend, self.device_type)
        return self

    def __str__(self) -> str:
        return f"{self.backend}-{self.device_type}"


def _kernels() -> list[Target]:
    found = [Target("triton", "cpu", triton_backend.CHUNK, False),
             Target("native", "cpu", NATIVE_CHUNK, True)]
    if torch.cuda.is_available():
        found += [Target("native", "cuda", NATIVE_CHUNK, False),
                  Target("triton", "cuda", triton_backend.CHUNK, False)]
    return found


#: The kernel backends on this machine's devices.
KERNELS = _kernels()
#: The pure-torch reference backend, which the kernels are compared with.
REFERENCE = Target("torch", "cpu", triton_backend.CHUNK, True)
#: The kernel backends on the CPU, where the optimizer-level tests run.
CPU_KERNEL_BACKENDS = ["triton", "native"]
#: The op backends of the optimizer-level tests: the reference and the CPU kernels.
OPTIMIZER_BACKENDS = ["torch", *CPU_KERNEL_BACKENDS]
