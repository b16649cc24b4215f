"""The shared part of the variants whose ascent follows a per-element moving average kept in the optimizer
state (Friendly-SAM's m, VaSSO's d): read the buffers, let the variant mix them with the gradient, and
commit the new buffers only once the step is taken.

NOTE (commit on success): the new buffers are computed at the ascent but written after the base step,
with a device select on the step's non-finite flag (no host read), so a skipped step leaves them as they
were; they join a parameter's state entry only after the base optimizer made it (torch's Adam and others
initialize an empty entry on their first step). ``started`` (a device flag) says whether any step was
taken: before that the buffers count as absent (the variants' first step is SAM's).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .policy import Policy, StepContext


def check_unit(name: str, value: float, *, low_open: bool, high_open: bool) -> float:
    """``value`` as a float in the unit interval with the given open ends, else a ValueError naming it."""
    inside = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
              and (value > 0 if low_open else value >= 0) and (value < 1 if high_open else value <= 1))
    if not inside:
        interval = ("(" if low_open else "[") + "0, 1" + (")" if high_open else "]")
        raise ValueError(f"{name}: must be a number in {interval}, got {value!r}")
    return float(value)


def refuse_options(variant: str, options: dict, *, adaptive: bool = False, renormalize: bool = False,
                   unnormalized: bool = False) -> None:
    """A ValueError naming the first SAM option given in ``options`` that ``variant`` does not combine
    with: ``adaptive`` (ASAM's weighting), ``renormalize`` (SSAM), ``normalize_ascent=False`` (USAM)."""
    if adaptive and options.get("adaptive"):
        raise ValueError(f"adaptive: {variant} sets its own ascent direction, which ASAM's |w| weighting "
                         "would distort; use SAM(adaptive=True) for ASAM")
    if renormalize and options.get("renormalize"):
        raise ValueError(f"renormalize: {variant} defines its own descent gradient, which SSAM's "
                         "renormalization would rescale; leave renormalize unset")
    if unnormalized and options.get("normalize_ascent", True) is False:
        raise ValueError(f"normalize_ascent=False: {variant} is defined with SAM's normalized ascent")


def true_grads(context: StepContext) -> list[torch.Tensor]:
    """The first gradients in true units (a GradScaler's scale divided out: a new list then)."""
    if context.inv_scale is None:
        return context.grads
    return torch._foreach_mul(context.grads, context.inv_scale)


class DirectionPolicy(Policy):
    """A variant that sets the ascent's direction (``ascent_direction``); ASAM's weighting, which would
    scale that direction elementwise again, is refused, at construction and for a group added later."""

    directs_ascent = True

    def ascent_weighting(self, group: dict) -> tuple[bool, float]:
        if group["sam_adaptive"]:
            raise ValueError(f"adaptive: a param group asks for ASAM's weighting, which {self.name} does "
                             "not combine with; set adaptive=False in the group")
        return False, 0.0


class EmaDirectionPolicy(DirectionPolicy):
    """A two-pass variant whose ascent direction and new buffer come from ``mix(g, buffer, started)``."""

    accumulates = False  # NOTE: its buffer follows each step's whole gradient
    #: The buffer's key in each parameter's optimizer state.
    state_key = ""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._started: torch.Tensor | None = None
        self._pending: tuple | None = None

    def mix(self, grads: list, buffers: list, started: torch.Tensor) -> tuple[list, list]:
        """(directions, new buffers) from the true gradients and the buffers (zeros before the first taken
        step, when ``started`` is 0)."""
        raise NotImplementedError

    def ascent_direction(self, context: StepContext) -> tuple[list, None]:
        grads = true_grads(context)
        # NOTE (per-tensor lookups): the buffers are state entries, replaced at every commit, so they are
        # looked up per parameter on the host, once per SAM step.
        state, key = context.state, self.state_key
        buffers = [state[p][key] if p in state and key in state[p] else torch.zeros_like(g)
                   for p, g in zip(context.plan.params, grads, strict=True)]
        started = self._started_flag(grads[0].device)
        directions, new = self.mix(grads, buffers, started.float())
        self._pending = (context.plan.params, buffers, new)
        return directions, None

    def descent(self, context: StepContext) -> torch.Tensor | None:
        if self._pending is not None:
            self._pending = (*self._pending, context.found_inf != 0)
        return super().descent(context)

    def after_step(self, context: StepContext) -> None:
        pending, self._pending = self._pending, None
        if pending is None or len(pending) < 4 or context.stepped is False:
            return
        params, old, new, skip = pending
        for param, before, after in zip(params, old, new, strict=True):
            # NOTE: a per-tensor select on the device (torch has no multi-tensor where).
            context.state[param][self.state_key] = torch.where(skip, before, after)
        self._started = self._started | ~skip

    def _started_flag(self, device: torch.device) -> torch.Tensor:
        if self._started is None or self._started.device != device:
            started = False if self._started is None else self._started
            self._started = torch.as_tensor(started, dtype=torch.bool, device=device)
        return self._started

    def variant_state(self) -> dict[str, Any]:
        return {} if self._started is None else {"started": self._started.clone()}

    def checked_variant_state(self, state: dict | None) -> dict | None:
        if state and (set(state) != {"started"} or not isinstance(state["started"], torch.Tensor)
                      or state["started"].numel() != 1):
            raise ValueError(f"state_dict['sam']['variant']: {self.name} keeps {{'started': a one-element "
                             f"tensor}}, got {state!r}")
        return state

    def load_variant_state(self, state: dict) -> None:
        value = state.get("started")
        self._started = None if value is None else value.detach().reshape(()).bool().clone()
