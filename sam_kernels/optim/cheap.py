"""SAM variants that skip or replace the second forward and backward (docs/algorithms.md):

- ``LookSAM`` (Liu et al., CVPR 2022): a SAM step every ``k`` steps that also keeps ``g_v``, the part of
  the SAM gradient orthogonal to the plain gradient; the steps between reuse it with one pass.
- ``MomentumSAM`` (Becker et al. 2024, MSAM): no extra pass at all; the weights sit at
  ``w - rho * v / ||v||`` (``v`` the SGD momentum buffer) and the gradient taken there drives the step.

The schedules of ``schedules.py`` (interval, randomized, late phase, AE-SAM) are options of SAM itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from .. import ops
from ..backends.common import PerturbConfig
from .checks import check_non_negative
from .plan import StepPlan
from .sam import SAM, _Ascent
from .schedules import Interval

#: The 0-d fp32 norm of the stored g_v in ``state_dict()["sam"]["variant"]``.
_GV_NORM = "gv_norm"


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
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k: must be an int >= 1 (a SAM step every k steps), got {k!r}")
        check_non_negative("alpha", alpha)
        if kwargs.get("schedule") is not None:
            raise ValueError("schedule: LookSAM takes a SAM step every k steps; pass k instead")
        if kwargs.get("capturable"):
            raise ValueError("capturable=True: LookSAM decides on the host which steps are SAM steps")
        self.k = k
        self.alpha = float(alpha)
        self._gv_norm: torch.Tensor | None = None
        self._first_grads: list[torch.Tensor] | None = None
        super().__init__(params, base_optimizer, rho=rho, schedule=Interval(k), **kwargs)

    # ----------------------------------------------------------------------- SAM hooks

    def _after_ascent(self, plan: StepPlan, grads: list[torch.Tensor]) -> None:
        # NOTE: one multi-tensor copy of g (the second backward overwrites the gradients).
        self._first_grads = torch._foreach_mul(grads, 1.0) if grads else []

    def _before_descent(self, ascent: _Ascent, plan: StepPlan, grads: list[torch.Tensor],
                        found_inf: torch.Tensor, grad_scale: torch.Tensor | None) -> None:
        if not grads:
            return
        if ascent.plain:
            self._reuse(ascent, plan, grads, grad_scale)
        else:
            self._refresh(plan, grads, found_inf, grad_scale)

    def _refresh(self, plan: StepPlan, grads: list[torch.Tensor], found_inf: torch.Tensor,
                 grad_scale: torch.Tensor | None) -> None:
        """g_v from g (kept by the ascent) and g_s (the current gradients), stored unless the step is
        skipped (then the previous g_v stays)."""
        first, self._first_grads = self._first_grads, None
        if first is None or len(first) != len(grads):
            return  # the gradient set changed between the passes: the descent ran from w, keep g_v
        g_squared = self._norm(plan, first)[0].square()
        gs_squared = self._norm(plan, grads)[0].square()
        difference = torch._foreach_sub(grads, first)
        d_squared = self._norm(plan, difference)[0].square()
        dot = (g_squared + gs_squared - d_squared) * 0.5
        coefficient = dot / torch.clamp(g_squared, min=torch.finfo(torch.float32).tiny)
        # NOTE: g_v = g_s - c g = (1 - c) g_s + c (g_s - g): one interpolation from the difference.
        torch._foreach_lerp_(difference, grads, 1.0 - coefficient)
        if grad_scale is not None:  # both passes were scaled by S: store g_v unscaled
            torch._foreach_mul_(difference, 1.0 / grad_scale.to(plan.device, torch.float32))
        gv_norm = self._norm(plan, difference)[0]
        skip = found_inf != 0
        for param, new in zip(plan.params, difference, strict=True):
            # NOTE: a per-tensor select on the device (torch has no multi-tensor where; no host read of
            # the flag); on refresh steps only.
            state = self.state[param]
            old = state.get("looksam_gv")
            state["looksam_gv"] = torch.where(skip, old if old is not None else torch.zeros_like(new), new)
        previous = self._gv_norm if self._gv_norm is not None else torch.zeros_like(gv_norm)
        self._gv_norm = torch.where(skip, previous.to(gv_norm.device), gv_norm)

    def _reuse(self, ascent: _Ascent, plan: StepPlan, grads: list[torch.Tensor],
               grad_scale: torch.Tensor | None) -> None:
        """g + alpha * ||g|| / ||g_v|| * g_v, in place (nothing to add before the first SAM step)."""
        # NOTE: one dict lookup per parameter on the host (g_v is optimizer state, replaced on every
        # refresh, so it is not one of the plan's cached lists).
        stored = [self.state[param].get("looksam_gv") if param in self.state else None
                  for param in plan.params]
        if self._gv_norm is None or any(gv is None for gv in stored):
            return
        coefficient = self.alpha * ascent.grad_norm / (self._gv_norm.to(plan.device) + self.eps)
        if grad_scale is not None:  # the gradients carry the scale S, g_v does not
            coefficient = coefficient * grad_scale.to(plan.device, torch.float32)
        torch._foreach_add_(grads, torch._foreach_mul(stored, coefficient))

    def _variant_state(self) -> dict[str, Any]:
        return {} if self._gv_norm is None else {_GV_NORM: self._gv_norm.clone()}

    def _checked_variant_state(self, state: dict | None) -> dict | None:
        if state is None:
            return None
        if set(state) - {_GV_NORM} or (state and (not isinstance(state[_GV_NORM], torch.Tensor)
                                                   or state[_GV_NORM].numel() != 1)):
            raise ValueError("state_dict['sam']['variant']: LookSAM keeps {'gv_norm': a one-element "
                             f"tensor}}, got {state!r}")
        return state

    def _load_variant_state(self, state: dict) -> None:
        value = state.get(_GV_NORM)
        self._gv_norm = None if value is None else value.detach().reshape(()).float().clone()


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
    supported (use bf16 autocast).
    """

    def __init__(self, params, lr: float = 0.1, *, momentum: float = 0.9, rho: float = 0.3,
                 dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False,
                 **kwargs: Any) -> None:
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 < momentum < 1:
            raise ValueError(f"momentum: MomentumSAM perturbs along the momentum buffer, so it must be "
                             f"in (0, 1), got {momentum!r}")
        for name in ("schedule", "adaptive", "renormalize", "capturable"):
            if kwargs.get(name):
                raise ValueError(f"{name}: not an option of MomentumSAM")
        if "base_optimizer" in kwargs:
            raise TypeError("base_optimizer: MomentumSAM's base optimizer is torch.optim.SGD")
        super().__init__(params, torch.optim.SGD, rho=rho, lr=lr, momentum=momentum,
                         dampening=dampening, weight_decay=weight_decay, nesterov=nesterov, **kwargs)

    # ------------------------------------------------------------------------- training loops

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One MSAM step; ``closure`` (optional) zeroes the gradients, computes the loss at the current
        (perturbed) weights and calls backward; it runs once."""
        if hasattr(self, "grad_scale") or hasattr(self, "found_inf"):
            raise RuntimeError("MomentumSAM: torch.amp.GradScaler is not supported; use bf16 autocast")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._momentum_step()
        return loss

    step.hooked = True  # NOTE (step hooks): SAM runs the hooks itself; see SAM.step

    def first_step(self, zero_grad: bool = False, *, grad_scaler: Any = None) -> None:
        raise RuntimeError("first_step(): MomentumSAM takes one pass per step: backward, then step()")

    def second_step(self, zero_grad: bool = False) -> None:
        raise RuntimeError("second_step(): MomentumSAM takes one pass per step: backward, then step()")

    def needs_second_pass(self) -> bool:
        return False

    @torch.no_grad()
    def _momentum_step(self) -> None:
        self._run_step_hooks("pre")
        if self._run.ascent is None:  # at w (the first step, or after unperturb())
            plan, _ = self._current_plan()
            zero = torch.zeros((), dtype=torch.float32, device=plan.device)
            self._run.ascent = _Ascent(plan, [False] * len(plan.params), zero, zero.clone(), plain=True)
        self._descend(None, None)

    def _after_step(self, plan: StepPlan) -> None:
        self._perturb_along_momentum(plan)

    def _perturb_along_momentum(self, plan: StepPlan | None = None) -> None:
        """w~ = w - rho * v / (||v|| + eps) per group's rho, the backups = w (nothing without momentum
        buffers). ``plan``: the step plan of the fused descent just run, whose lists it reuses."""
        if plan is not None and plan.kind == "sgd":
            # NOTE: the fused step's own lists, so no per-parameter state lookup on the hot path.
            parts = [(plan.local[g.start:g.stop], g.state.buffers, plan.backups[g.start:g.stop],
                      g.positions, g.group) for g in plan.groups]
            backend = plan.backend
        else:
            parts, backend = self._momentum_lists(), None
        buffers = [buffer for part in parts for buffer in part[1]]
        if not buffers:
            return
        params = [param for part in parts for param in part[0]]
        norm = ops.grad_norm(params, buffers, backend=self.backend)[0]
        # NOTE (atomic ascent): recorded before the first perturbation (see SAM.first_step).
        ascent = self._run.ascent = _Ascent(plan if backend is not None else None, None, norm,
                                            torch.zeros_like(norm))
        for params, buffers, backups, positions, group in parts:
            rho = float(group["sam_rho"])
            if backend is not None:
                config = PerturbConfig(rho=rho, eps=self.eps, scale_factor=-1.0, seed=self.seed)
                backend.perturb_(params, buffers, backups, positions, norm, self._rng_step(norm.device),
                                 config)
            else:
                ops.perturb_(params, backups, norm, grads=buffers, rho=rho, eps=self.eps,
                             scale_factor=-1.0, tensor_indices=positions, backend=self.backend)
            ascent.perturbed.append((params, backups))

    def _momentum_lists(self) -> list[tuple]:
        """(params, momentum buffers, backups, global positions, group) of each group, from the state."""
        parts, position = [], 0
        for group in self.param_groups:
            held = []
            for param in group["params"]:
                buffer = self.state[param].get("momentum_buffer") if param in self.state else None
                if buffer is not None:
                    held.append((param, buffer, self._backup(param), position))
                position += 1
            if held:
                parts.append(tuple([item[j] for item in held] for j in range(4)) + (group,))
        return parts

    # ---------------------------------------------------------------- unperturbed weights

    def unperturb(self) -> None:
        """Put the weights back to the unperturbed ``w`` (bit for bit); the next step takes its
        gradient there (call ``perturb()`` first to continue exactly)."""
        self._abandon_ascent()

    def perturb(self) -> None:
        """Move to ``w~ = w - rho * v / ||v||`` now (a no-op when already there): after loading a
        checkpoint, or after ``unperturb()``."""
        if self._run.ascent is None:
            with torch.no_grad():
                self._perturb_along_momentum()

    @contextlib.contextmanager
    def unperturbed(self) -> Iterator[None]:
        """Inside: the unperturbed weights (evaluate, save); at exit the same perturbation again."""
        was_perturbed = self._run.ascent is not None
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
