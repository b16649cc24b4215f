"""Friendly-SAM (Li et al., CVPR 2024, arXiv 2403.12350): the ascent along the gradient with its
full-batch part, estimated by an EMA m of past gradients, taken out: u = g - sigma m_{t-1},
e = rho u / ||u||, then m = lambd m + (1 - lambd) g (the raw minibatch gradient). The first step is SAM's
(m = g)."""

from __future__ import annotations

from typing import Any

import torch

from .checks import check_non_negative
from .ema_direction import EmaDirectionPolicy, check_unit, refuse_options
from .policy import policy_options
from .sam import SAM


class FriendlySAMPolicy(EmaDirectionPolicy):
    name = "FriendlySAM"
    state_key = "friendly_sam_m"

    def __init__(self, sigma: float = 1.0, lambd: float = 0.9, **options: Any) -> None:
        check_non_negative("sigma", sigma)
        self.sigma = float(sigma)
        self.lambd = check_unit("lambd", lambd, low_open=False, high_open=True)
        super().__init__(**options)

    def mix(self, grads, buffers, started):
        # u = g - sigma m (m counts only once started); m' = lambd m + (1 - lambd) g, or g before any step
        # (a lerp with weight 1 from m = 0 gives g exactly).
        directions = torch._foreach_sub(grads, torch._foreach_mul(buffers, started * self.sigma))
        new = [m.lerp(g, weight) for m, g, weight in
               zip(buffers, grads, [1.0 - self.lambd * started] * len(grads), strict=True)]
        return directions, new


class FriendlySAM(SAM):
    """Friendly-SAM over any torch.optim base (see the module docstring). ``sigma`` (>= 0, 1 in the paper)
    weighs the full-batch estimate taken out of the ascent; ``lambd`` in [0, 1) is its EMA factor (0.9,
    the official code's class default; its training scripts use 0.95 and 0.6). m is optimizer state
    (``state[p]["friendly_sam_m"]``)."""

    def __init__(self, params, base_optimizer, *, rho: float = 0.05, sigma: float = 1.0, lambd: float = 0.9,
                 **kwargs: Any) -> None:
        refuse_options("FriendlySAM", kwargs, adaptive=True)
        policy = FriendlySAMPolicy(sigma, lambd, **policy_options(kwargs))
        super().__init__(params, base_optimizer, rho=rho, policy=policy, **kwargs)
