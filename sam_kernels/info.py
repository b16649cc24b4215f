"""``python -m sam_kernels.info``: what is installed, what this machine offers the kernels, and which
backend runs on each device. Exits with status 1 when the environment (``SAM_KERNELS_BACKEND``) asks for
a backend that cannot run here."""

from __future__ import annotations

import os
import sys

import torch

import sam_kernels
from sam_kernels.backends import report, resolve


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "not installed"
    return triton.__version__


#: CPU flags each x86-64 micro-architecture level of the native loops' clones needs (GCC's levels).
_LEVELS = (("x86-64-v4 (AVX-512)", {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}),
           ("x86-64-v3 (AVX2)", {"avx2", "fma", "bmi1", "bmi2", "movbe", "f16c"}))


def native_cpu_level() -> str:
    """The clone of the native CPU loops that the loader picks on this CPU, judged from its flags
    (csrc/cpu/ops_cpu.cpp builds each loop for x86-64-v4, x86-64-v3 and the baseline)."""
    try:
        with open("/proc/cpuinfo") as handle:
            flags = next((set(line.split(":", 1)[1].split()) for line in handle
                          if line.startswith("flags")), set())
    except OSError:
        return "unknown (no /proc/cpuinfo)"
    return next((name for name, needed in _LEVELS if needed <= flags), "baseline x86-64 (SSE2)")


def environment() -> str:
    """Versions (and where sam_kernels was imported from), the CPU kernels' instruction sets and the thread
    count."""
    capability = torch.backends.cpu.get_cpu_capability()
    location = os.path.dirname(sam_kernels.__file__)
    return (f"sam_kernels {sam_kernels.__version__} ({location}), torch {torch.__version__}, "
            f"triton {_triton_version()}, CUDA available: {torch.cuda.is_available()}\n"
            f"CPU: native kernels' clone {native_cpu_level()}; torch's kernels {capability}; "
            f"{torch.get_num_threads()} threads")


def unusable_requests() -> list[str]:
    """The errors of resolving the requested backend on each present device (empty: all fine)."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    errors = []
    for device in devices:
        try:
            resolve(torch.device(device))
        except (ValueError, RuntimeError) as error:
            errors.append(f"{device}: {error}")
    return errors


def main() -> int:
    print(environment())
    print(report())
    errors = unusable_requests()
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
