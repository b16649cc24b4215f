"""The descent of a SAM step: the second gradients' non-finite flag, the policy's multiplier (AMP's
unscale, SSAM's renormalization, ...), then either the fully fused restore-and-step or the generic path
(restore, then the base optimizer's own step)."""

from __future__ import annotations

from collections.abc import MutableMapping

import torch

from . import amp
from .base import base_step, clear_grads, run_step_hooks
from .plan import StepPlan, kept_mask
from .policy import StepContext


@torch.no_grad()
def run(engine, workspace, grad_scale: torch.Tensor | None, scaler_found_inf, zero_grad: bool,
        from_step: bool) -> None:
    """``engine``'s descent (``workspace``: its ``Workspace``) and the step's end: the counters advance,
    the policy's ``after_step``, LR schedulers told, the post-hooks."""
    ascent, scaler_found_inf = checked_ascent(engine, workspace.ascent, grad_scale, scaler_found_inf,
                                              from_step)
    # NOTE (atomic descent): the ascent is forgotten only once the descent has run; any error before that
    # (a bad gradient, a state tensor that does not fit, a failing base step) puts the weights back to w
    # and leaves the optimizer state as it was.
    with engine._restoring_on_error():
        context = descend(engine, workspace, ascent, grad_scale, scaler_found_inf)
    workspace.ascent = None
    workspace.grad_marks = None  # NOTE: step(closure) records again once its descent is done
    workspace.advance()
    with engine._restoring_on_error():
        engine.policy.after_step(context)
    workspace.release()  # NOTE: after after_step, which may still read context.grads
    # NOTE: torch's LR schedulers warn unless the optimizer marks itself as stepped; the two-call loop
    # never calls step(), so the descent sets the flag that their step() wrapper would set.
    engine._opt_called = True
    engine.base_optimizer._opt_called = True  # a scheduler may be attached to the base optimizer
    run_step_hooks(engine, "post")
    if zero_grad:
        clear_grads(engine)


def descend(engine, run, ascent, grad_scale: torch.Tensor | None,
            scaler_found_inf: torch.Tensor | None) -> StepContext:
    """The descent proper of ``engine`` (``run``: its ``Workspace``): the second gradients' flag and the
    policy's multiplier, then the fused or generic step; returns the context it ran with."""
    plan, kept = ascent.plan, ascent.kept
    ascent.unstash()  # NOTE: a plain step whose second backward was skipped: the first gradients come back
    grads = plan.grads() if plan is not None else None
    if (grads is None or plan is not run.plan
            or run.plan_key(engine, engine._descent_kind()) != plan.key):
        # NOTE: the gradient set changed between the passes (rare): put w back first, then descend
        # with a plan of the current gradients from unperturbed weights.
        run.restore(ascent, engine.backend)
        plan, grads = engine._plan()
        kept = [False] * len(plan.params)
    context = engine._context(plan, grads, ascent)
    if grad_scale is not None:
        context.grad_scale = grad_scale.to(plan.device)
        context.inv_scale = amp.inverse(context.grad_scale)
    norm = None
    if scaler_found_inf is not None:
        # NOTE: GradScaler sums its per-device flags, so a flag may exceed 1; the ops want 0 or 1 (the
        # engine's own flags are 0 or 1 already).
        scaler_found_inf = (scaler_found_inf.to(device=plan.device, dtype=torch.float32) != 0).float()
    if scaler_found_inf is not None and not engine.policy.needs_descent_norm:
        nonfinite = scaler_found_inf  # NOTE: the scaler has just checked every gradient; no norm pass
    else:
        norm, nonfinite = context.norm(grads)
        if scaler_found_inf is not None:
            nonfinite = torch.maximum(nonfinite, scaler_found_inf)
    context.found_inf = torch.maximum(ascent.nonfinite, nonfinite)
    context.descent_norm = norm
    if ascent.grad_scaler is not None:
        amp.record_found_inf(ascent.grad_scaler, engine, context.found_inf)
    multiplier = engine.policy.descent(context)
    if plan.kind is None:
        run.restore(ascent, engine.backend)
        context.stepped = generic(plan, context.found_inf, multiplier, engine.base_optimizer)
    else:
        fused(plan, grads, kept, context.found_inf, multiplier, engine.state)
    return context


def checked_ascent(engine, ascent, grad_scale: torch.Tensor | None, scaler_found_inf,
                   from_step: bool) -> tuple:
    """(the pending ascent, the scaler's flag as a tensor) for a descent, or an error raised with the
    weights put back to w when the descent does not fit the ascent (GradScaler's protocol)."""
    if scaler_found_inf is not None and not isinstance(scaler_found_inf, torch.Tensor):
        # NOTE: GradScaler sums its per-device flags; with no gradient to check (a plain step whose
        # gradients were put aside) the sum is the int 0, and the ascent's flag covers them.
        scaler_found_inf = torch.tensor(float(scaler_found_inf))
    if ascent is None:
        raise RuntimeError("second_step(): no first_step() before it")
    from_scaler = from_step and scaler_found_inf is not None
    if ascent.grad_scaler is not None and not from_scaler:
        engine._abandon_ascent()
        raise RuntimeError("step(): the ascent ran under a GradScaler but the descent did not come from "
                           "scaler.step(optimizer); the weights were restored and this step skipped")
    if from_scaler and ascent.grad_scaler is None and grad_scale is not None:
        engine._abandon_ascent()
        raise RuntimeError("scaler.step(optimizer): the ascent's gradients were scaled too; pass "
                           "first_step(grad_scaler=scaler); the weights were restored and this step "
                           "skipped")
    return ascent, scaler_found_inf


def fused(plan: StepPlan, grads: list[torch.Tensor], kept: list[bool] | None, found_inf: torch.Tensor,
          multiplier: torch.Tensor | None, state: MutableMapping) -> None:
    """w = backup and the base optimizer's step, one fused op per param group; skipped on the device
    when ``found_inf`` is set."""
    # NOTE (atomic descent): the state was gathered and checked when the plan was built and every
    # group's options are read here, before any kernel runs; state the step created is stored
    # only after every group ran.
    configs = [group_plan.state.config(group_plan.group) for group_plan in plan.groups]
    if plan.lists_for(grads) is not None:  # NOTE: the lists and gradients are taken in C++ (plan.py)
        mask = kept_mask(kept)
        for group_plan, config in zip(plan.groups, configs, strict=True):
            group_plan.state.run_prepared(config, multiplier, found_inf, mask)
    else:
        # NOTE: a parameter that was not perturbed (no ascent gradient, or dropped by ESAM's SWP) is its
        # own backup: "w = backup" then reads the current weight, elementwise, before the same element
        # is written.
        backups = plan.backups if kept is None else [
            backup if keep else param
            for backup, param, keep in zip(plan.backups, plan.local, kept, strict=True)]
        for group_plan, config in zip(plan.groups, configs, strict=True):
            rows = slice(group_plan.start, group_plan.stop)
            group_plan.state.run(plan.backend, plan.local[rows], backups[rows], grads[rows], config,
                                 multiplier, found_inf)
    for group_plan in plan.groups:
        group_plan.state.commit(state)


def generic(plan: StepPlan, found_inf: torch.Tensor, multiplier: torch.Tensor | None,
            base: torch.optim.Optimizer) -> bool:
    """The base optimizer's own step with the (scaled) second gradients, the weights already restored;
    returns whether it ran."""
    if multiplier is not None and plan.params:
        torch._foreach_mul_([p.grad for p in plan.params], multiplier)
    # NOTE (host sync): the base optimizer's own step takes no device flag, so skipping it on a
    # non-finite gradient reads the flag on the host, once per step, as torch's GradScaler does.
    # This is the generic path's only sync; the fused path has none.
    if found_inf.item() != 0:
        return False
    base_step(base)
    return True
