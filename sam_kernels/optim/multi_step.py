"""Multi-step SAM: the inner maximization of SAM taken in n normalized-gradient ascent steps instead of
one, each from the current perturbed point along its own gradient, projected on the rho-ball (projected
gradient ascent, as optax's ``sam`` with several adversarial steps; analysed by Kim et al., "Exploring
the effect of multi-step ascent in sharpness-aware minimization", arXiv 2302.10181). n + 1 forward and
backward passes per step; one backup (w) for all of them.

    e_0 = 0;  e_j = P(e_{j-1} + a * rho * g_j / ||g_j||),  g_j = grad L(w + e_{j-1}),  j = 1..n
    P(e) = e * min(1, rho / ||e||);   the descent: the base optimizer's step with grad L(w + e_n) from w

``step_size`` a is relative to rho and defaults to 1/n: the n steps then add up to at most rho, so the
projection can never act and is skipped (the triangle inequality); n = 1 is SAM.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from ..backends.common import PerturbConfig
from .checks import check_positive
from .policy import Policy, StepContext, policy_options
from .sam import SAM


class MultiStepPolicy(Policy):
    """SAM's ascent in ``steps`` normalized steps of ``step_size * rho`` each, projected on the ball."""

    name = "MultiStepSAM"

    def __init__(self, steps: int = 2, step_size: float | None = None, **options: Any) -> None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"ascent_steps: the number of ascent steps, an int >= 1, got {steps!r}")
        if step_size is not None:
            check_positive("step_size", step_size)
        super().__init__(**options)
        self.ascent_steps = steps
        self.step_size = 1.0 / steps if step_size is None else float(step_size)
        #: NOTE (projection): only when the steps can leave the ball (n * a > 1).
        self.projects = steps * self.step_size > 1.0

    def perturb_config(self, group: dict, eps: float, seed: int) -> PerturbConfig:
        config = super().perturb_config(group, eps, seed)
        return replace(config, rho=config.rho * self.step_size)

    def after_ascent(self, context: StepContext) -> None:
        if self.projects and context.plan.params:
            self.project(context)

    def project(self, context: StepContext) -> None:
        """e = w - backup scaled by min(1, rho / ||e||) on the device, w = backup + e: two multi-tensor
        passes and one fused norm (the temporaries e are freed after the step)."""
        plan = context.plan
        radii = {float(group_plan.group["sam_rho"]) for group_plan in plan.groups}
        if any(group_plan.group["sam_adaptive"] for group_plan in plan.groups):
            raise ValueError("adaptive: ASAM's ascent has no Euclidean rho-ball to project on; keep "
                             "step_size <= 1 / ascent_steps with adaptive=True")
        if len(radii) != 1:
            raise ValueError("rho: MultiStepSAM projects on one rho-ball, so every param group needs the "
                             f"same rho when steps * step_size > 1, got {sorted(radii)}")
        offsets = torch._foreach_sub(plan.local, plan.backups)
        norm = context.norm(offsets)[0]
        factor = torch.clamp(radii.pop() / (norm + context.eps), max=1.0)
        torch._foreach_mul_(offsets, factor)
        torch._foreach_add_(offsets, plan.backups)
        torch._foreach_copy_(plan.local, offsets)


class MultiStepSAM(SAM):
    """SAM with ``ascent_steps`` ascent steps (see the module docstring) over any torch.optim base.

    Two-call style: ``first_step()`` after the first backward and again after each of the next
    ``ascent_steps - 1`` backwards (inside ``second_pass()``), then the last backward and
    ``second_step()``; ``step(closure)`` runs the closure ``ascent_steps + 1`` times. ``step_size``:
    each step's length relative to rho (default ``1 / ascent_steps``)."""

    def __init__(self, params, base_optimizer, *, rho: float = 0.05, ascent_steps: int = 2,
                 step_size: float | None = None, **kwargs: Any) -> None:
        if kwargs.get("adaptive") and (step_size is not None and ascent_steps * step_size > 1.0):
            raise ValueError("adaptive: ASAM's ascent has no Euclidean rho-ball to project on; keep "
                             "step_size <= 1 / ascent_steps with adaptive=True")
        policy = MultiStepPolicy(ascent_steps, step_size, **policy_options(kwargs))
        super().__init__(params, base_optimizer, rho=rho, policy=policy, **kwargs)
