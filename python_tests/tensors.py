"""Seeded test tensors and their copies: the one helper every op test module builds its inputs with."""

from __future__ import annotations

import torch


def make_tensors(shapes, dtype=torch.float32, seed: int = 0, scale: float = 1.0, device="cpu") -> list:
    """Standard normal values times ``scale``, one tensor per shape, drawn in fp32 on the CPU from
    ``seed`` (so every dtype and device gets the same values, rounded), then cast and moved."""
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=generator) * scale).to(dtype).to(device) for s in shapes]


def randn64(shapes, seed: int, scale: float = 1.0) -> list:
    """float64 values drawn in float64, which float32 cannot hold (so fp32 math anywhere would show)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=generator, dtype=torch.float64) * scale for s in shapes]


def clones(tensors) -> list:
    """A copy of each tensor (None stays None)."""
    return [t.clone() if t is not None else None for t in tensors]
