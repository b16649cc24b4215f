"""Sparse SAM's masks (``sparse_sam.py``): the optimizer-state keys, the exact kept count, the global
top-k, the 1-bit packing, the seeds of the dynamic criterion's random streams, and option checks.

NOTE (mask storage): element i of the flattened (logical, row-major) tensor is bit i % 8 of byte i // 8
(least significant first), ``ceil(numel / 8)`` bytes per tensor.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import torch

CRITERIA = ("fisher", "dynamic")
SCORES = ("gradient", "weight", "random")
#: The optimizer-state keys: the packed mask, and the Fisher accumulator (held only during the steps
#: that feed the next refresh; the gradient's dtype).
MASK_KEY = "sparse_sam_mask"
FISHER_KEY = "sparse_sam_fisher"
#: The random streams of the dynamic criterion (``stream_seed``).
STREAM_INITIAL, STREAM_DROP, STREAM_GROW = 0, 1, 2

_MASK64 = (1 << 64) - 1


def _mix64(value: int) -> int:
    """SplitMix64's finalizer."""
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def stream_seed(seed: int, step: int, stream: int) -> int:
    """The seed of a random draw of the dynamic criterion at ``step``:
    ``mix64(seed * 0x9E3779B97F4A7C15 + mix64(4 * step + stream + 0x632BE59BD9B4E019))`` mod 2**64, so a
    resumed run draws what the uninterrupted one would (nothing to save but the optimizer's seed)."""
    return _mix64((seed * 0x9E3779B97F4A7C15 + _mix64((4 * step + stream + 0x632BE59BD9B4E019) & _MASK64))
                  & _MASK64)


def kept_count(numel: int, sparsity: float) -> int:
    """K = floor((1 - sparsity) * numel), exact in ``sparsity``'s binary value (no float rounding)."""
    return math.floor(numel * (1 - Fraction(sparsity)))


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """A bool mask of exactly ``k`` elements of the 1-d ``scores``: the largest, ties to the earlier index.

    NOTE (ties, memory): the k-th largest value from ``topk`` (k values and indices, transient), then every
    element above it and the first ``k - #above`` equal to it (a cumulative count), so the count is exact
    whatever the ties (zero gradients tie often) and no device value is read on the host."""
    n = scores.numel()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=scores.device)
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=scores.device)
    kth = torch.topk(scores, k, sorted=False).values.min()
    above = scores > kth
    tied = scores == kth
    needed = k - above.sum()
    return above | (tied & (torch.cumsum(tied, 0) <= needed))


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """The 1-d bool ``bits`` as uint8 bytes (``ceil(n / 8)``), element i in bit i % 8 of byte i // 8."""
    n = bits.numel()
    padded = torch.zeros(-(-n // 8) * 8, dtype=torch.uint8, device=bits.device)
    padded[:n] = bits
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    return torch.sum(padded.view(-1, 8) << shifts, dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor) -> torch.Tensor:
    """The bits of uint8 ``packed`` as a 1-d bool tensor of ``8 * packed.numel()`` elements."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    return ((packed.reshape(-1, 1) >> shifts) & 1).view(-1).bool()


def _check_int(name: str, value: Any, minimum: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: must be an int >= {minimum} ({what}), got {value!r}")
    return value


def _check_score(name: str, value: Any) -> str:
    if value not in SCORES:
        raise ValueError(f"{name}: must be one of {', '.join(map(repr, SCORES))}, got {value!r}")
    return value


def param_name(groups: list[dict], param: torch.Tensor) -> str:
    """``param_groups[g]['params'][i]`` of ``param`` (for messages)."""
    for g, group in enumerate(groups):
        for i, other in enumerate(group["params"]):
            if other is param:
                return f"param_groups[{g}]['params'][{i}]"
    return "a parameter"
