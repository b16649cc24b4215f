"""Counting what one call dispatches: ATen ops, and Triton kernel launches (``kernel[grid](...)``)."""

from __future__ import annotations

import contextlib
from collections import Counter

from torch.utils._python_dispatch import TorchDispatchMode


class CountingKernel:
    """Stands in for a ``@triton.jit`` function and counts its ``kernel[grid](...)`` launches under
    ``name`` in ``counts``."""

    def __init__(self, kernel, counts: Counter, name: str):
        self.kernel, self.counts, self.name = kernel, counts, name

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def counted(*args, **kwargs):
            self.counts[self.name] += 1
            return launch(*args, **kwargs)

        return counted


@contextlib.contextmanager
def triton_launches(names: list[str] | None = None):
    """Count the launches of sam_kernels' Triton kernels inside the block; yields name -> launches.

    ``names``: the kernels to count (every ``*_kernel`` of ``triton_kernels`` by default). Without
    Triton nothing is patched and the counts stay empty.

    NOTE (lookup): the backend looks each kernel up on the ``triton_kernels`` module at launch time, so
    replacing the module attribute is what intercepts the launches.
    """
    counts: Counter = Counter()
    try:
        from sam_kernels.backends import triton_kernels
    except ImportError:
        yield counts
        return
    if names is None:
        names = [name for name in dir(triton_kernels)
                 if name.endswith("_kernel") and hasattr(getattr(triton_kernels, name), "__getitem__")]
    originals = {name: getattr(triton_kernels, name) for name in names}
    try:
        for name, kernel in originals.items():
            setattr(triton_kernels, name, CountingKernel(kernel, counts, name))
        yield counts
    finally:
        for name, kernel in originals.items():
            setattr(triton_kernels, name, kernel)


class _CountOps(TorchDispatchMode):
    """Counts the ATen ops that run under it."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def count_launches(fn) -> int:
    """ATen ops plus Triton kernel launches of one call of ``fn``."""
    with triton_launches() as launched, _CountOps() as counter:
        fn()
    return counter.ops + sum(launched.values())
