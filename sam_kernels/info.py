"""``python -m sam_kernels.info``: what is installed, what this machine offers the kernels, and which
backend runs on each device. Exits with status 1 when the environment (``SAM_KERNELS_BACKEND``) asks for
a backend that cannot run here."""

from __future__ import annotations

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


def environment() -> str:
    """Versions, the CPU kernels' instruction set and the thread count."""
    capability = torch.backends.cpu.get_cpu_capability()
    return (f"sam_kernels {sam_kernels.__version__}, torch {torch.__version__}, triton {_triton_version()}, "
            f"CUDA available: {torch.cuda.is_available()}\n"
            f"CPU: torch's kernels use {capability}; the native CPU kernels are built for the portable "
            f"target of the compiler (no -march), vectorized by it; {torch.get_num_threads()} threads")


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
