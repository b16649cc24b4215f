"""The descent of a SAM step: the second gradients' non-finite flag and multiplier (AMP's unscale,
SSAM's renormalization), then either the fully fused restore-and-step or the generic path (restore,
then the base optimizer's own step)."""

from __future__ import annotations

from collections.abc import Callable, MutableMapping

import torch

from . import amp
from .base import base_step
from .plan import StepPlan


def flag_and_multiplier(ascent_nonfinite: torch.Tensor, target_norm: torch.Tensor | None,
                        norm_of: Callable, grads: list[torch.Tensor], grad_scale: torch.Tensor | None,
                        scaler_found_inf: torch.Tensor | None, eps: float,
                        device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(found_inf, multiplier) of the descent, both on the device.

    ``found_inf`` is 1.0 when either pass's gradient is not finite (or the scaler found an inf).
    ``multiplier`` scales the second gradients: 1/S under a GradScaler, times
    ``target_norm / (||g2|| + eps)`` for SSAM (``target_norm``: the ascent gradient's norm; None
    without renormalization); None when there is nothing to scale.
    """
    inv_scale = amp.inverse(grad_scale.to(device)) if grad_scale is not None else None
    norm = None
    if scaler_found_inf is not None and target_norm is None:
        # NOTE: the scaler has just checked every gradient of this optimizer; no second norm pass.
        nonfinite = scaler_found_inf.to(device=device, dtype=torch.float32)
    else:
        norm, nonfinite = norm_of(grads)
        if scaler_found_inf is not None:
            nonfinite = torch.maximum(nonfinite, scaler_found_inf.to(device=device, dtype=torch.float32))
    # NOTE: GradScaler sums its per-device flags, so a flag may exceed 1; the ops want 0 or 1.
    found_inf = (torch.maximum(ascent_nonfinite, nonfinite) != 0).float()
    multiplier = inv_scale
    if target_norm is not None:
        true_norm = norm if inv_scale is None else norm * inv_scale
        multiplier = target_norm / (true_norm + eps)
        if inv_scale is not None:
            multiplier = multiplier * inv_scale
    return found_inf, multiplier


def fused(plan: StepPlan, grads: list[torch.Tensor], kept: list[bool] | None, found_inf: torch.Tensor,
          multiplier: torch.Tensor | None, state: MutableMapping) -> None:
    """w = backup and the base optimizer's step, one fused op per param group; skipped on the device
    when ``found_inf`` is set."""
    # NOTE: a parameter that was not perturbed (no ascent gradient, or dropped by ESAM's SWP) is its
    # own backup: "w = backup" then reads the current weight, elementwise, before the same element
    # is written.
    backups = plan.backups if kept is None else [
        backup if keep else param for backup, param, keep in zip(plan.backups, plan.local, kept,
                                                                  strict=True)]
    # NOTE (atomic descent): the state was gathered and checked when the plan was built and every
    # group's options are read here, before any kernel runs; state the step created is stored
    # only after every group ran.
    configs = [group_plan.state.config(group_plan.group) for group_plan in plan.groups]
    for group_plan, config in zip(plan.groups, configs, strict=True):
        rows = slice(group_plan.start, group_plan.stop)
        group_plan.state.run(plan.backend, plan.local[rows], backups[rows], grads[rows], config,
                             multiplier, found_inf)
    for group_plan in plan.groups:
        group_plan.state.commit(state)


def generic(plan: StepPlan, found_inf: torch.Tensor, multiplier: torch.Tensor | None,
            base: torch.optim.Optimizer) -> None:
    """The base optimizer's own step with the (scaled) second gradients, the weights already restored."""
    if multiplier is not None and plan.params:
        torch._foreach_mul_([p.grad for p in plan.params], multiplier)
    # NOTE (host sync): the base optimizer's own step takes no device flag, so skipping it on a
    # non-finite gradient reads the flag on the host, once per step, as torch's GradScaler does.
    # This is the generic path's only sync; the fused path has none.
    if found_inf.item() == 0:
        base_step(base)
