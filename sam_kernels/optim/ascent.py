"""The ascent of a SAM step: the first gradients' norm (weighted as the policy says), the policy's
decision whether this is a SAM step, then one perturb op per param group (``Workspace.perturb``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from . import accumulation, amp
from .base import clear_grads
from .gradients import as_list
from .policy import Policy
from .workspace import Ascent, ascent_parts, select


def ascend(engine, run, scaler: Any, zero_grad: bool) -> None:
    """The body of ``engine.first_step`` after its pre-hooks (``run``: its ``Workspace``; ``scaler``: an
    enabled GradScaler or None)."""
    policy, left_out = engine.policy, excluded(engine)
    plan, grads = engine._plan(frozenset(map(id, left_out)))
    kept = None
    if left_out:
        ids = set(map(id, left_out))
        kept = [id(p) not in ids for p in plan.params]
    norm, nonfinite = run.ascent_norm(plan, grads, kept, policy.ascent_weighting)
    plain_norm = norm
    planned = engine._planned_sam_step()
    if ((policy.needs_ascent_norm or planned is None)
            and any(policy.ascent_weighting(g.group)[0] for g in plan.groups)):
        plain_norm = run.norm(plan, select(grads, kept))[0]
    inv_scale = None
    if scaler is not None:
        scale = amp.current_scale(scaler, plan.device)
        inv_scale = amp.inverse(scale)
        plain_norm = plain_norm * inv_scale
    if planned is None:
        planned = policy.is_sam_step(run.step, engine.seed, plain_norm.square(), nonfinite == 0)
    if not planned:
        ascent = run.ascent = Ascent(plan, [False] * len(plan.params), plain_norm, nonfinite, scaler,
                                     plain=True)
        accumulation.unpark(engine, run, ascent)
        if zero_grad:  # a plain step: the gradients (with a micro-batch sum) are put aside, not copied
            ascent.stashed = [(param, param.grad) for param in engine._params() if param.grad is not None]
            clear_grads(engine)
        return
    directions = None
    if policy.directs_ascent and grads:
        context = engine._context(plan, grads, None)
        context.inv_scale = inv_scale
        directions = policy.ascent_direction(context)
    if directions is not None:
        # NOTE: a policy's direction is in true units, so the GradScaler's scale is already out of it.
        directions, own_norm = directions
        norm, flag = own_norm or run.ascent_norm(plan, directions, kept, policy.ascent_weighting)
        nonfinite = torch.maximum(nonfinite, flag)
    elif scaler is not None:
        norm = scaled_norm(engine, norm, scale, grads, kept)
    # NOTE (atomic ascent): the ascent is recorded before the first perturbation, so that an error in a
    # later group's op puts the groups already perturbed back to w (``_restoring_on_error``).
    ascent = run.ascent = Ascent(plan, kept, plain_norm, nonfinite, scaler)
    if plan.params:
        with engine._restoring_on_error():
            run.perturb_plan(ascent, grads if directions is None else directions, norm,
                             lambda group: policy.perturb_config(group, engine.eps, engine.seed),
                             engine.backend)
    if type(policy).after_ascent is not Policy.after_ascent:  # NOTE: no context to build for SAM itself
        with engine._restoring_on_error():
            policy.after_ascent(engine._context(plan, grads, ascent))
    if zero_grad or run.parked is not None:
        clear_grads(engine)
    if policy.ascent_steps == 1:  # NOTE: a multi-step policy takes the sum back at its last step
        accumulation.unpark(engine, run, ascent)


def ascend_further(engine, run, scaler: Any, zero_grad: bool) -> None:
    """A further ascent step of a multi-step policy (``Policy.ascent_steps``): from the current point
    w + e along its own gradient, ``after_ascent`` then projecting as the policy says; the backups keep
    the w of the first step."""
    ascent, policy = run.ascent, engine.policy
    if ascent.plain or ascent.count >= policy.ascent_steps:
        raise RuntimeError("first_step(): called twice; a SAM step is first_step() then second_step()"
                           + (f" ({policy.name} takes {policy.ascent_steps} ascent steps)"
                              if policy.ascent_steps > 1 else ""))
    if (scaler is None) != (ascent.grad_scaler is None):
        engine._abandon_ascent()
        raise RuntimeError("first_step(): every ascent step of a SAM step takes the same grad_scaler; the "
                           "weights were restored and this step skipped")
    with engine._restoring_on_error():
        plan, grads = engine._plan()
        if plan is not ascent.plan:
            raise RuntimeError("first_step(): the set of parameters with a gradient changed between the "
                               "ascent steps; the weights were restored and this step skipped")
        norm, nonfinite = run.ascent_norm(plan, grads, None, policy.ascent_weighting)
        if scaler is not None:
            norm = scaled_norm(engine, norm, amp.current_scale(scaler, plan.device), grads, None)
        ascent.nonfinite = torch.maximum(ascent.nonfinite, nonfinite)
        ascent.count += 1
        # NOTE (one backup): a further step must not overwrite the backups (they hold w), so its perturb
        # op writes its copy of the current point into a temporary, freed at once.
        parts = [(params, directions, [torch.empty_like(p) for p in params], positions, group)
                 for params, directions, _, positions, group in ascent_parts(plan, grads, None)]
        further = Ascent(plan, None, norm, nonfinite)
        run.perturb(further, parts, norm, lambda group: policy.perturb_config(group, engine.eps, engine.seed),
                    engine.backend)
        policy.after_ascent(engine._context(plan, grads, ascent))
    if zero_grad or run.parked is not None:
        clear_grads(engine)
    if ascent.count == policy.ascent_steps:
        accumulation.unpark(engine, run, ascent)


def scaled_norm(engine, norm: torch.Tensor, scale: torch.Tensor, grads: list, kept) -> torch.Tensor:
    """The perturb op's norm for gradients scaled by a GradScaler's ``scale`` S (USAM's gradients are
    unscaled in place instead)."""
    if engine.policy.normalize:
        # NOTE: the op's scale is rho / (norm + eps) times the scaled gradient S * g; passing
        # norm_S + (S - 1) * eps makes it rho / (||g|| + eps) * g, the unscaled ascent. A non-finite
        # norm stays non-finite, so the op still leaves the weights untouched.
        return norm + (scale - 1.0) * engine.eps
    if grads:
        torch._foreach_mul_(select(as_list(grads), kept), amp.inverse(scale))
    return norm


def excluded(engine) -> list[torch.Tensor]:
    """The tensors ``engine``'s policy leaves out of this step's ascent (none on a plain step)."""
    if not engine.policy.drops_tensors or not engine._planned_sam_step():
        return []
    params = [param for group in engine.param_groups for param in group["params"]]
    return engine.policy.excluded(params, engine.step_count, engine.seed)


@contextlib.contextmanager
def exclusion_pass(engine) -> Iterator[None]:
    """Inside: the excluded tensors' ``requires_grad`` off, so autograd skips their weight gradients;
    back on at exit, even on an error (user-frozen tensors are never touched)."""
    dropped = [param for param in excluded(engine) if param.requires_grad]
    for param in dropped:
        param.requires_grad_(False)
    try:
        yield
    finally:
        for param in dropped:
            param.requires_grad_(True)


@contextlib.contextmanager
def ascent_pass(engine) -> Iterator[None]:
    """The context of the first (ascent) forward and backward of the steps the engine drives:
    ``ascent_context`` on SAM steps, then ``exclusion_pass``.

    NOTE (plain steps under DDP): a plain step of a schedule descends with the first gradient, which must
    then be the synced one, so a per-worker ascent context (``model.no_sync``) is left out; a schedule
    that decides only after the first backward (AE-SAM) cannot know, so it is refused."""
    context = contextlib.nullcontext()
    if engine.ascent_context is not None:
        planned = engine._planned_sam_step()
        if planned is None:
            raise ValueError(f"ascent_context: {type(engine.policy.schedule).__name__} decides after the "
                             "first backward whether the step is plain, and a plain step needs that "
                             "backward synced; use a globally synced ascent (no ascent_context) or a host "
                             "schedule")
        context = engine.ascent_context() if planned else context
    with context, exclusion_pass(engine):
        yield
