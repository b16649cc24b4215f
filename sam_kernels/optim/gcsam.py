"""Gradient-centralized SAM (arXiv 2501.11584): the ascent gradient of each weight tensor with more than one
dimension centred, its mean over all dimensions but the first (one mean per output row or channel)
subtracted, before the norm and the perturbation; 1-d tensors (biases, norm scales) as they are.

NOTE (layout): the mean is over the logical dimensions 1..n-1, whatever the memory format, so a
channels_last convolution weight is centred per output channel exactly like its contiguous copy."""

from __future__ import annotations

from typing import Any

import torch

from .ema_direction import DirectionPolicy, refuse_options, true_grads
from .policy import StepContext, policy_options
from .sam import SAM


def centred(grad: torch.Tensor) -> torch.Tensor:
    if grad.dim() <= 1:
        return grad
    return grad - grad.mean(dim=tuple(range(1, grad.dim())), keepdim=True)


class GCSAMPolicy(DirectionPolicy):
    name = "GCSAM"

    def ascent_direction(self, context: StepContext) -> tuple[list, None]:
        # NOTE (per-tensor loop): each tensor has its own reduction shape, which no multi-tensor op takes.
        return [centred(g) for g in true_grads(context)], None


class GCSAM(SAM):
    """SAM whose ascent gradient is centralized per output row (see the module docstring)."""

    def __init__(self, params, base_optimizer, *, rho: float = 0.05, **kwargs: Any) -> None:
        refuse_options("GCSAM", kwargs, adaptive=True)
        super().__init__(params, base_optimizer, rho=rho, policy=GCSAMPolicy(**policy_options(kwargs)),
                         **kwargs)
