"""Definitions every backend shares: the random-mask contract and tensor grouping.

NOTE (mask contract, identical in every backend): the Bernoulli(keep_prob) mask of the perturbation is
never stored. For element ``i`` of the tensor at global position ``t`` (its position in the optimizer's
parameter order, so grouping by dtype and chunking never change a mask) at RNG step ``s`` it is
regenerated as

    r = Philox4x32-10(key = (seed & 0xffffffff, seed >> 32),
                      counter = (i, t, s & 0xffffffff, s >> 32))[0]      # first output word
    keep(i) = (r >> 8) < round(keep_prob * 2**24)

An integer comparison on the top 24 bits leaves no floating-point rounding that a backend could do
differently, so the same seed and step give the same mask bit for bit everywhere.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

#: Number of random bits compared against the keep threshold.
MASK_BITS = 24

U32 = 0xFFFFFFFF


def mask_threshold(keep_prob: float) -> int:
    """Integer threshold of the keep test ``(r >> 8) < threshold``; 2**24 keeps every element."""
    return round(keep_prob * (1 << MASK_BITS))


def split_u64(value: int) -> tuple[int, int]:
    """(low, high) 32-bit words of a non-negative integer below 2**64."""
    return value & U32, (value >> 32) & U32


def group_by_dtype(tensors: Sequence[torch.Tensor]) -> list[list[int]]:
    """Positions of ``tensors`` grouped by dtype, groups in order of first appearance."""
    groups: dict[torch.dtype, list[int]] = defaultdict(list)
    for position, tensor in enumerate(tensors):
        groups[tensor.dtype].append(position)
    return list(groups.values())
