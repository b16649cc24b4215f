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

import itertools
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


def _byte_span(tensor: torch.Tensor) -> tuple[int, int] | None:
    """[first, last) byte addresses ``tensor`` can touch, or None when it has no memory to race on (no
    elements, or a tensor without storage such as torch.compile's fake tensors)."""
    if tensor.numel() == 0:
        return None
    try:
        start = tensor.data_ptr()
    except RuntimeError:
        return None
    if start == 0:
        return None
    extent = 1 + sum((size - 1) * abs(stride) for size, stride in zip(tensor.shape, tensor.stride()))
    return start, start + extent * tensor.element_size()


def first_overlap(tensors: Sequence[torch.Tensor]) -> tuple[int, int] | None:
    """Positions ``(i, j)``, ``i < j``, of two tensors whose memory overlaps (the same tensor twice
    included), or None. NOTE: compares address ranges per device, so two disjoint views of one storage
    pass and a view that interleaves another (strided) is conservatively reported. Under torch.compile
    the tensors have no addresses to compare and nothing is reported (the optimizers check theirs when
    the parameter set is built, outside any compiled region)."""
    if torch.compiler.is_compiling():
        return None
    spans = []
    for position, tensor in enumerate(tensors):
        span = _byte_span(tensor)
        if span is not None:
            spans.append((str(tensor.device), span[0], span[1], position))
    spans.sort()
    for (device_a, _, end_a, pos_a), (device_b, start_b, _, pos_b) in itertools.pairwise(spans):
        if device_a == device_b and start_b < end_a:
            return min(pos_a, pos_b), max(pos_a, pos_b)
    return None
