"""Momentum SAM (Becker et al. 2024, MSAM): no extra pass at all; the weights sit at
``w - rho * v / ||v||`` (``v`` the SGD momentum buffer) and the gradient taken there drives the step
(docs/algorithms.md)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from .. import ops
from ..backends.common import PerturbConfig
from . import combinations
from .base import run_step_hooks
from .policy import Policy, StepContext, policy_options
from .sam import SAM


class MomentumSAMPolicy(Policy):
    """MSAM's ascent: along ``-v`` (the momentum buffers), taken right after each descent for the next
    step's gradient, instead of along the gradient before it."""

    name = "MomentumSAM"
    fused_ops = ("sgd",)

    def after_step(self, context: StepContext) -> None:
        self.perturb_along_momentum(context)

    def perturb_along_momentum(self, context: StepContext) -> None:
        """w~ = w - rho * v / (||v|| + eps) per group's rho, the backups = w (nothing without momentum
        buffers). ``context.plan``: the step plan of the fused SGD descent just run, whose lists it
        reuses; else (the generic path, or outside a step) the lists come from the optimizer state."""
        plan = context.plan if context.plan is not None and context.plan.kind == "sgd" else None
        if plan is not None:
            # NOTE: the fused step's own lists, so no per-parameter state lookup on the hot path.
            parts = [(plan.local[g.start:g.stop], g.state.buffers, plan.backups[g.start:g.stop],
                      g.positions, g.group) for g in plan.groups]
        else:
            parts = _momentum_lists(context)
        buffers = [buffer for part in parts for buffer in part[1]]
        if not buffers:
            return
        params = [param for part in parts for param in part[0]]
        norm = ops.grad_norm(params, buffers, backend=context.backend)[0]
        eps, seed = context.eps, context.seed
        context.perturb(plan, parts, norm, lambda group: PerturbConfig(
            rho=float(group["sam_rho"]), eps=eps, scale_factor=-1.0, seed=seed))


def _momentum_lists(context: StepContext) -> list[tuple]:
    """(params, momentum buffers, backups, global positions, group) of each group, from the state."""
    parts, position, state = [], 0, context.state
    for group in context.param_groups:
        held = []
        for param in group["params"]:
            buffer = state[param].get("momentum_buffer") if param in state else None
            if buffer is not None:
                held.append((param, buffer, context.backup(param), position))
            position += 1
        if held:
            parts.append(tuple([item[j] for item in held] for j in range(4)) + (group,))
    return parts


class MomentumSAM(SAM):
    """Momentum SAM (MSAM): SGD with momentum whose gradient is taken at ``w - rho * v / ||v||``.

    One forward and backward per step, like SGD. Between steps the parameters hold the perturbed
    weights ``w~``; ``step()`` moves back to ``w`` (from the backup, bit for bit), takes torch's SGD step
    with the gradient of ``w~``, then perturbs again along the new momentum buffer ``v``
    (``||v||``: the global norm over every parameter; eps 1e-12). The first step (``v = 0``) takes its
    gradient at ``w``.

    Evaluate and save the unperturbed weights inside ``with optimizer.unperturbed():`` (on exit the
    same ``w~`` comes back, bit for bit), or call ``unperturb()`` at the end of training. After loading a
    checkpoint (model first, then this optimizer) call ``perturb()`` before the next forward to resume
    exactly. ``first_step``/``second_step`` do not apply (there is no second pass). GradScaler is not
    supported (use bf16 autocast). SGD's other options (weight decay, damping, Nesterov) and SAM's
    (``seed``, ``fused``, ``backend``, ...) are keyword arguments.
    """

    def __init__(self, params, lr: float = 0.1, *, momentum: float = 0.9, rho: float = 0.3,
                 **kwargs: Any) -> None:
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 < momentum < 1:
            raise ValueError(f"momentum: MomentumSAM perturbs along the momentum buffer, so it must be "
                             f"in (0, 1), got {momentum!r}")
        for name in ("adaptive", "renormalize"):
            if kwargs.get(name):
                raise ValueError(f"{name}: not an option of MomentumSAM")
        base = kwargs.pop("base_optimizer", torch.optim.SGD)
        super().__init__(params, base, rho=rho, policy=MomentumSAMPolicy(**policy_options(kwargs)), lr=lr,
                         momentum=momentum, **kwargs)

    # ------------------------------------------------------------------------- training loops

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One MSAM step; ``closure`` (optional) zeroes the gradients, computes the loss at the current
        (perturbed) weights and calls backward; it runs once."""
        if hasattr(self, "grad_scale") or hasattr(self, "found_inf"):
            combinations.check(combinations.combination_of(self.policy, self.base_optimizer, self.fused,
                                                           self.foreach, self.capturable, amp=True))
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            run_step_hooks(self, "pre")
            self._one_pass_step()
        return loss

    step.hooked = True  # NOTE (step hooks): SAM runs the hooks itself; see SAM.step

    def first_step(self, zero_grad: bool = False, *, grad_scaler: Any = None) -> None:
        raise RuntimeError("first_step(): MomentumSAM takes one pass per step: backward, then step()")

    def second_step(self, zero_grad: bool = False) -> None:
        raise RuntimeError("second_step(): MomentumSAM takes one pass per step: backward, then step()")

    def needs_second_pass(self) -> bool:
        return False

    # ---------------------------------------------------------------- unperturbed weights

    def unperturb(self) -> None:
        """Put the weights back to the unperturbed ``w`` (bit for bit); the next step takes its
        gradient there (call ``perturb()`` first to continue exactly)."""
        self._abandon_ascent()

    def perturb(self) -> None:
        """Move to ``w~ = w - rho * v / ||v||`` now (a no-op when already there): after loading a
        checkpoint, or after ``unperturb()``."""
        if not self._pending_ascent():
            with torch.no_grad():
                self.policy.perturb_along_momentum(self._context(None, None, None))

    @contextlib.contextmanager
    def unperturbed(self) -> Iterator[None]:
        """Inside: the unperturbed weights (evaluate, save); at exit the same perturbation again."""
        was_perturbed = self._pending_ascent()
        self.unperturb()
        try:
            yield
        finally:
            if was_perturbed:
                self.perturb()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load (the weights are first put back to ``w``); call ``perturb()`` before the next forward."""
        self.unperturb()
        super().load_state_dict(state_dict)

    def _check_not_perturbed(self, what: str) -> None:
        # NOTE: state_dict() may run while the weights are perturbed: the optimizer state (the momentum)
        # is the same either way, and the weights are saved unperturbed inside unperturbed().
        return None
