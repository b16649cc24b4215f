"""WSAM (Yue et al., KDD 2023, arXiv 2305.15817): the weighted objective L + gamma / (1 - gamma)
(L(w + e) - L(w)), alpha = gamma / (1 - gamma).

Decoupled (the default, the authors' code and recommendation): the base optimizer steps from w with the
first gradient g, then w -= lr * alpha * (g_s - g), outside momentum and weight decay. Coupled: the base
optimizer steps with alpha g_s + (1 - alpha) g; to first order that is SAM with radius alpha * rho, so the
perturbation's effect grows with alpha (at alpha 9 and rho 0.2 it diverges on a small noisy problem)."""

from __future__ import annotations

from typing import Any

import torch

from .checks import check_bool
from .ema_direction import check_unit, refuse_options
from .gsam import TwoGradientPolicy
from .policy import StepContext, policy_options
from .sam import SAM


class WSAMPolicy(TwoGradientPolicy):
    name = "WSAM"

    def __init__(self, gamma: float = 0.9, decoupled: bool = True, **options: Any) -> None:
        gamma = check_unit("gamma", gamma, low_open=False, high_open=True)
        check_bool("decoupled", decoupled)
        super().__init__(**options)
        self.gamma, self.decoupled = gamma, decoupled
        self.alpha = gamma / (1.0 - gamma)
        self._correction: tuple | None = None

    def descent(self, context: StepContext) -> torch.Tensor | None:
        first = self.first_gradients(context)
        multiplier = super().descent(context)
        if first is None:
            return multiplier
        grads = context.grads
        if not self.decoupled:
            torch._foreach_mul_(grads, self.alpha)
            torch._foreach_add_(grads, first, alpha=1.0 - self.alpha)
            return multiplier
        difference = torch._foreach_sub(grads, first)
        torch._foreach_copy_(grads, first)
        self._correction = (difference, multiplier, context.found_inf != 0)
        return multiplier

    def after_step(self, context: StepContext) -> None:
        """w -= lr * alpha * (g_s - g) per param group, nothing on a skipped step."""
        correction, self._correction = self._correction, None
        if correction is None or context.stepped is False:
            return
        difference, multiplier, skip = correction
        plan = context.plan
        for group_plan in plan.groups:
            rows = slice(group_plan.start, group_plan.stop)
            factor = -float(group_plan.group["lr"]) * self.alpha
            if multiplier is not None:  # a GradScaler's 1/S: g_s - g carries the scale
                factor = multiplier * factor
            # NOTE: a per-tensor select on the device (torch has no multi-tensor where); a skipped step's
            # difference is not finite, and 0 * inf would not leave w alone.
            steps = [torch.where(skip, torch.zeros_like(d), d * factor) for d in difference[rows]]
            torch._foreach_add_(plan.local[rows], steps)


class WSAM(SAM):
    """WSAM over any torch.optim base (see the module docstring); ``gamma`` in [0, 1) (0.9 by default,
    alpha 9), ``decoupled`` (True)."""

    def __init__(self, params, base_optimizer, *, rho: float = 0.05, gamma: float = 0.9,
                 decoupled: bool = True, **kwargs: Any) -> None:
        refuse_options("WSAM", kwargs, renormalize=True, unnormalized=True)
        policy = WSAMPolicy(gamma, decoupled, **policy_options(kwargs))
        super().__init__(params, base_optimizer, rho=rho, policy=policy, **kwargs)
