"""LookSAM (Liu et al., CVPR 2022): a SAM step every ``k`` steps that also keeps ``g_v``, the part of the
SAM gradient orthogonal to the plain gradient; the steps between reuse it with one pass
(docs/algorithms.md)."""

from __future__ import annotations

from typing import Any

import torch

from .checks import check_non_negative
from .policy import Policy, StepContext, policy_options
from .sam import SAM
from .schedules import Interval

#: The 0-d fp32 norm of the stored g_v in ``state_dict()["sam"]["variant"]``.
_GV_NORM = "gv_norm"


class LookSAMPolicy(Policy):
    """LookSAM's decisions: SAM on every ``k``-th step; the descent refreshes ``g_v`` on SAM steps and
    adds ``alpha * ||g|| / ||g_v|| * g_v`` to the gradient on the others."""

    accumulates = False  # NOTE: g_v follows the whole step's gradients

    name = "LookSAM"

    def __init__(self, k: int = 5, alpha: float = 0.7, **options: Any) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k: must be an int >= 1 (a SAM step every k steps), got {k!r}")
        check_non_negative("alpha", alpha)
        super().__init__(**options)
        self.k = k
        self.alpha = float(alpha)
        self._gv_norm: torch.Tensor | None = None
        self._first_grads: list[torch.Tensor] | None = None
        #: (params, new g_v, skip flag) of a refresh, stored by ``after_step``.
        self._pending: tuple | None = None

    decides_steps = True

    def planned_sam_step(self, step: int, seed: int) -> bool | None:
        return step % self.k == 0

    def after_ascent(self, context: StepContext) -> None:
        # NOTE: one multi-tensor copy of g (the second backward overwrites the gradients).
        self._first_grads = torch._foreach_mul(context.grads, 1.0) if context.grads else []

    def descent(self, context: StepContext) -> torch.Tensor | None:
        # NOTE (order): SAM's multiplier (AMP's 1/S, SSAM's ratio) is taken from the gradients as they
        # arrive; the g_v term is added after it, in place.
        multiplier = super().descent(context)
        if context.grads:
            if context.plain:
                self._reuse(context)
            else:
                self._refresh(context)
        return multiplier

    def _refresh(self, context: StepContext) -> None:
        """g_v from g (kept by the ascent) and g_s (the current gradients), stored unless the step is
        skipped (then the previous g_v stays)."""
        first, self._first_grads = self._first_grads, None
        grads = context.grads
        if first is None or len(first) != len(grads):
            return  # the gradient set changed between the passes: the descent ran from w, keep g_v
        g_squared = context.norm(first)[0].square()
        gs_squared = context.norm(grads)[0].square()
        difference = torch._foreach_sub(grads, first)
        d_squared = context.norm(difference)[0].square()
        dot = (g_squared + gs_squared - d_squared) * 0.5
        coefficient = dot / torch.clamp(g_squared, min=torch.finfo(torch.float32).tiny)
        # NOTE: g_v = g_s - c g = (1 - c) g_s + c (g_s - g): one interpolation from the difference.
        torch._foreach_lerp_(difference, grads, 1.0 - coefficient)
        device = context.plan.device
        if context.grad_scale is not None:  # both passes were scaled by S: store g_v unscaled
            torch._foreach_mul_(difference, 1.0 / context.grad_scale.to(device, torch.float32))
        gv_norm = context.norm(difference)[0]
        skip = context.found_inf != 0
        self._pending = (context.plan.params, difference, skip)
        previous = self._gv_norm if self._gv_norm is not None else torch.zeros_like(gv_norm)
        self._gv_norm = torch.where(skip, previous.to(gv_norm.device), gv_norm)

    def after_step(self, context: StepContext) -> None:
        """Store the refreshed g_v in the optimizer state, after the base step.

        NOTE (order): torch's Adam, RMSprop and others create their state on a parameter's first step
        when its state entry is empty, so g_v joins the entry only once the base optimizer made it; a step
        the generic path skipped (``context.stepped`` False) keeps the previous g_v untouched."""
        pending, self._pending = self._pending, None
        if pending is None or context.stepped is False:
            return
        params, difference, skip = pending
        for param, new in zip(params, difference, strict=True):
            # NOTE: a per-tensor select on the device (torch has no multi-tensor where; no host read of
            # the flag); on refresh steps only.
            state = context.state[param]
            old = state.get("looksam_gv")
            state["looksam_gv"] = torch.where(skip, old if old is not None else torch.zeros_like(new), new)

    def _reuse(self, context: StepContext) -> None:
        """g + alpha * ||g|| / ||g_v|| * g_v, in place (nothing to add before the first SAM step)."""
        # NOTE: one dict lookup per parameter on the host (g_v is optimizer state, replaced on every
        # refresh, so it is not one of the plan's cached lists).
        state, device = context.state, context.plan.device
        stored = [state[param].get("looksam_gv") if param in state else None
                  for param in context.plan.params]
        if self._gv_norm is None or any(gv is None for gv in stored):
            return
        coefficient = self.alpha * context.ascent_norm / (self._gv_norm.to(device) + context.eps)
        if context.grad_scale is not None:  # the gradients carry the scale S, g_v does not
            coefficient = coefficient * context.grad_scale.to(device, torch.float32)
        torch._foreach_add_(context.grads, torch._foreach_mul(stored, coefficient))

    def variant_state(self) -> dict[str, Any]:
        return {} if self._gv_norm is None else {_GV_NORM: self._gv_norm.clone()}

    def checked_variant_state(self, state: dict | None) -> dict | None:
        if state is None:
            return None
        if set(state) - {_GV_NORM} or (state and (not isinstance(state[_GV_NORM], torch.Tensor)
                                                   or state[_GV_NORM].numel() != 1)):
            raise ValueError("state_dict['sam']['variant']: LookSAM keeps {'gv_norm': a one-element "
                             f"tensor}}, got {state!r}")
        return state

    def load_variant_state(self, state: dict) -> None:
        value = state.get(_GV_NORM)
        self._gv_norm = None if value is None else value.detach().reshape(()).float().clone()


class LookSAM(SAM):
    """LookSAM: every ``k``-th step a SAM step that also stores
    ``g_v = g_s - (<g, g_s> / ||g||^2) g`` (``g`` the gradient at w, ``g_s`` at w + e); the ``k - 1``
    steps between are plain one-pass steps with ``g + alpha * (||g|| / ||g_v||) * g_v``.

    Norms and the dot product are global over every parameter with a gradient (the paper treats the
    weights as one vector; some implementations work per tensor). ``g_v`` is optimizer state
    (``state[p]["looksam_gv"]``, checkpointed; its norm in ``state_dict()["sam"]["variant"]``). The first
    step is a SAM step; before any ``g_v`` exists a plain step uses ``g`` alone. A plain step adds the
    ``g_v`` term to ``.grad`` in place. Two-call loop: call ``needs_second_pass()`` after
    ``first_step()`` (see SAM); ``step(closure)`` runs the closure once on the plain steps.

    NOTE (cost): a plain step is one forward and backward plus two multi-tensor passes (the ``g_v``
    term); a SAM step adds to SAM's ascent one copy of ``g`` and, at the descent, three fused norm
    passes, a subtraction and an interpolation (``<g, g_s>`` by the polarization identity
    ``(||g||^2 + ||g_s||^2 - ||g_s - g||^2) / 2``, so the fused norm kernel gives every scalar).
    """

    def __init__(self, params, base_optimizer, *, rho: float = 0.05, k: int = 5, alpha: float = 0.7,
                 **kwargs: Any) -> None:
        policy = LookSAMPolicy(k, alpha, **policy_options(kwargs))
        super().__init__(params, base_optimizer, rho=rho, policy=policy, **kwargs)

    k = property(lambda self: self.policy.k, lambda self, value: setattr(self.policy, "k", value))
    schedule = property(lambda self: Interval(self.policy.k), doc="LookSAM's SAM steps, ``Interval(k)``.")
    alpha = property(lambda self: self.policy.alpha, lambda self, value: setattr(self.policy, "alpha", value))
