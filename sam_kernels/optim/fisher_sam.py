"""Fisher-SAM (Kim et al., ICML 2022, arXiv 2206.04920): the ascent radius measured in the Fisher metric,
diagonal and estimated by the squared gradient: e = rho * (g / (1 + eta g^2)) / sqrt(sum g^2 / (1 + eta g^2)),
an elementwise weighting shaped like ASAM's but from the gradient."""

from __future__ import annotations

from typing import Any

import torch

from .checks import check_non_negative
from .ema_direction import DirectionPolicy, refuse_options, true_grads
from .policy import StepContext, policy_options
from .sam import SAM


class FisherSAMPolicy(DirectionPolicy):
    name = "FisherSAM"

    def __init__(self, eta: float = 1.0, **options: Any) -> None:
        check_non_negative("eta", eta)
        self.eta = float(eta)
        super().__init__(**options)

    def ascent_direction(self, context: StepContext) -> tuple[list, tuple]:
        # NOTE (passes): q = 1 + eta g^2, the direction g / q and the norm of g / sqrt(q) (whose square
        # sums g^2 / q), as multi-tensor ops over the whole list and one fused norm.
        grads = true_grads(context)
        q = torch._foreach_addcmul([torch.ones_like(g) for g in grads], grads, grads, value=self.eta)
        directions = torch._foreach_div(grads, q)
        torch._foreach_sqrt_(q)
        return directions, context.norm(torch._foreach_div(grads, q))


class FisherSAM(SAM):
    """Fisher-SAM over any torch.optim base (see the module docstring); ``eta`` >= 0 (0 is SAM)."""

    def __init__(self, params, base_optimizer, *, rho: float = 0.05, eta: float = 1.0,
                 **kwargs: Any) -> None:
        refuse_options("FisherSAM", kwargs, adaptive=True)
        policy = FisherSAMPolicy(eta, **policy_options(kwargs))
        super().__init__(params, base_optimizer, rho=rho, policy=policy, **kwargs)
