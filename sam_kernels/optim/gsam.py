"""GSAM (Zhuang et al., ICLR 2022, arXiv 2203.08065): SAM's ascent; the descent along
g_s - alpha * g_perp, g_perp = g - (<g, g_s> / ||g_s||^2) g_s the part of the first gradient g orthogonal to
the second, g_s. Inner products and norms are global over every parameter with a gradient (the weights as
one vector, as in the official code). GSAM's rho follows the learning rate: ``ProportionalRho``."""

from __future__ import annotations

from typing import Any

import torch

from .ema_direction import check_unit, refuse_options
from .policy import Policy, StepContext, policy_options
from .sam import SAM


class TwoGradientPolicy(Policy):
    """A variant whose descent combines the first gradient g with the second: g is copied at the ascent
    (one multi-tensor copy; the second backward overwrites the gradients)."""

    accumulates = False  # NOTE: its descent pairs the step's one first gradient with the second

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._first: list[torch.Tensor] | None = None

    def after_ascent(self, context: StepContext) -> None:
        self._first = torch._foreach_mul(context.grads, 1.0)

    def first_gradients(self, context: StepContext) -> list[torch.Tensor] | None:
        """The copy of g for this descent (None when the gradient set changed between the passes: the
        descent then runs from w with the current gradients, as SAM's)."""
        first, self._first = self._first, None
        if first is None or context.plain or len(first) != len(context.grads):
            return None
        return first


class GSAMPolicy(TwoGradientPolicy):
    name = "GSAM"

    def __init__(self, alpha: float = 0.2, **options: Any) -> None:
        self.alpha = check_unit("alpha", alpha, low_open=False, high_open=True)
        super().__init__(**options)

    def descent(self, context: StepContext) -> torch.Tensor | None:
        first = self.first_gradients(context)
        if first is not None:
            # d = g_s - alpha (g - c g_s) = (1 + alpha c) g_s - alpha g, c = <g, g_s> / ||g_s||^2, with
            # <g, g_s> by polarization (|g|^2 + |g_s|^2 - |g_s - g|^2) / 2 from the fused norm kernel.
            # Both passes carry the same GradScaler scale, which c does not see; the engine's multiplier
            # takes it out of d.
            grads = context.grads
            g_squared = context.norm(first)[0].square()
            gs_squared = context.norm(grads)[0].square()
            d_squared = context.norm(torch._foreach_sub(grads, first))[0].square()
            dot = (g_squared + gs_squared - d_squared) * 0.5
            coefficient = dot / (gs_squared + context.eps)
            torch._foreach_mul_(grads, 1.0 + self.alpha * coefficient)
            torch._foreach_add_(grads, first, alpha=-self.alpha)
        return super().descent(context)


class GSAM(SAM):
    """GSAM over any torch.optim base (see the module docstring); ``alpha`` in [0, 1) (0.2 in the official
    code's example; 0 is SAM)."""

    def __init__(self, params, base_optimizer, *, rho: float = 0.05, alpha: float = 0.2,
                 **kwargs: Any) -> None:
        refuse_options("GSAM", kwargs, renormalize=True, unnormalized=True)
        policy = GSAMPolicy(alpha, **policy_options(kwargs))
        super().__init__(params, base_optimizer, rho=rho, policy=policy, **kwargs)
