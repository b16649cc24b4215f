"""VaSSO (Li and Giannakis, NeurIPS 2023, arXiv 2309.15639): the ascent along a variance-suppressed
gradient estimate d = (1 - theta) d + theta g (d = g on the first step), e = rho d / ||d||."""

from __future__ import annotations

from typing import Any

from .ema_direction import EmaDirectionPolicy, check_unit, refuse_options
from .policy import policy_options
from .sam import SAM


class VaSSOPolicy(EmaDirectionPolicy):
    name = "VaSSO"
    state_key = "vasso_d"

    def __init__(self, theta: float = 0.9, **options: Any) -> None:
        self.theta = check_unit("theta", theta, low_open=True, high_open=False)
        super().__init__(**options)

    def mix(self, grads, buffers, started):
        # d' = d + theta' (g - d), theta' = theta once started, 1 before (d = 0 then, so d' = g exactly).
        weight = 1.0 - (1.0 - self.theta) * started
        new = [d.lerp(g, weight) for d, g in zip(buffers, grads, strict=True)]
        return new, new


class VaSSO(SAM):
    """VaSSO over any torch.optim base (see the module docstring). ``theta`` in (0, 1] (0.9, the official
    code's); d is optimizer state (``state[p]["vasso_d"]``)."""

    def __init__(self, params, base_optimizer, *, rho: float = 0.05, theta: float = 0.9,
                 **kwargs: Any) -> None:
        refuse_options("VaSSO", kwargs, adaptive=True)
        policy = VaSSOPolicy(theta, **policy_options(kwargs))
        super().__init__(params, base_optimizer, rho=rho, policy=policy, **kwargs)
