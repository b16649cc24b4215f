"""The engine's working state between calls: the step plan and its upkeep, the pending ascent, the
iteration counters (host and device), the backups, and the norms and restores over them.

Only the engine (``sam.SAM``) holds a ``Workspace``; policies see a step through ``policy.StepContext``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from .. import ops
from ..backends import entry
from ..backends.common import same_layout
from ..distributed import all_reduce_norm, local_tensor, shard_group
from . import closure_convention, fused_steps
from .gradients import as_list
from .plan import StepPlan, kept_mask
from .policy import StepContext


def select(items: list, mask: list[bool] | None) -> list:
    """The items where ``mask`` is True (all of them for no mask)."""
    if mask is None:
        return items
    return [item for item, keep in zip(items, mask, strict=True) if keep]


@dataclass
class Ascent:
    """What ``first_step`` leaves for the descent."""

    #: The step plan of the ascent (None: perturbed outside a step, through the op layer).
    plan: StepPlan | None
    #: Per planned parameter, whether it was perturbed (None: every one was).
    kept: list[bool] | None
    #: Global norm of the plain ascent gradient (unweighted, unscaled; see ``StepContext``).
    grad_norm: torch.Tensor
    #: 1.0 when the ascent gradient was not finite (the weights were then left unperturbed).
    nonfinite: torch.Tensor
    #: The enabled GradScaler of the ascent (``first_step(grad_scaler=...)``), else None.
    grad_scaler: Any = None
    #: (local params, backups) of each perturb call made over Python lists, and the plan groups perturbed
    #: through its C++ lists (their rows in ``kept``): what a restore puts back.
    perturbed: list = field(default_factory=list)
    perturbed_groups: list[int] = field(default_factory=list)
    #: A plain step (the schedule said no SAM): nothing was perturbed and the descent uses the first
    #: gradients, put aside in ``stashed`` when ``first_step(zero_grad=True)`` cleared them.
    plain: bool = False
    stashed: list | None = None
    #: Ascent steps taken (a multi-step policy takes ``Policy.ascent_steps``).
    count: int = 1
    #: The gradients hold the micro-batches' running sum (put back at the last ascent step).
    holds_sum: bool = False

    def unstash(self) -> None:
        """A plain step's gradients, put aside by ``first_step(zero_grad=True)``, back where none is."""
        for param, grad in self.stashed or ():
            if param.grad is None:
                param.grad = grad


@dataclass
class Parked:
    """The summed SAM gradients of the micro-batches accumulated so far (``SAM.accumulate``), off the
    parameters while the next micro-batch takes its first gradient."""

    #: (parameter, its summed gradient) pairs.
    grads: list
    #: 1.0 when an ascent gradient of an accumulated micro-batch was not finite.
    nonfinite: torch.Tensor


#: The error of a ``zero_grad()`` (or a closure's) that would drop the micro-batches' running sum.
DROPPED_SUM = ("zero_grad(): the gradients hold the micro-batches' running sum (micro-batch SAM) from a "
               "micro-batch's first_step() to its accumulate() or descent, and a closure passed to "
               "accumulate() or to step() after accumulate() must not zero them; clear the first gradients "
               "with first_step(zero_grad=True)")


@torch.compiler.disable
def _advance_host_step(run: Workspace) -> None:
    """One more SAM step on the host counter.

    NOTE (compile guards): dynamo specializes on Python ints it reads, so incrementing the counter in
    traced code would guard on its value and recompile the step every step; left untraced, the
    counter costs one graph break at the end of the descent instead.
    """
    run.step += 1


class Workspace:
    """What changes from step to step, held outside the optimizer object.

    NOTE: torch.compile (dynamo) models a torch.optim.Optimizer specially and drops attribute writes
    on it made inside a compiled region; writes to this plain object are kept.
    """

    def __init__(self) -> None:
        #: What ``first_step`` leaves for the descent; None outside a SAM step.
        self.ascent: Ascent | None = None
        #: SAM iterations on the host (saved by state_dict); ``device_step`` mirrors it on the
        #: parameters' device for the kernels (no copy per step). Both advance together, once per
        #: descent, skipped steps included.
        self.step = 0
        self.device_step: torch.Tensor | None = None
        #: The step plan (plan.py) and the counter whose bumps invalidate it.
        self.plan: StepPlan | None = None
        self.plan_generation = 0
        #: (step, decision) of a host schedule, made once per step (ESAM's SWP asks before the ascent).
        self.decision: tuple[int, bool] | None = None
        #: The backup buffer of each parameter (of its local shard), allocated once.
        self.backups: dict[torch.Tensor, torch.Tensor] = {}
        #: The gradients as ``step(closure)`` or ``zero_grad()`` last left them, to tell a first pass the
        #: loop ran itself (see closure_convention.py); None after any other descent.
        self.grad_marks: Any = closure_convention.CLEARED
        self.warned_ascent_context = False
        #: The micro-batches' summed SAM gradients between ``accumulate()`` and the next first step.
        self.parked: Parked | None = None

    def check_sum_kept(self, parked: Parked | None) -> None:
        """After a closure's pass at w: it must not have dropped the micro-batches' running sum."""
        if parked is not None and self.parked is None:
            raise RuntimeError(DROPPED_SUM)

    # ---------------------------------------------------------------------------- counters

    def rng_step(self, device: torch.device) -> torch.Tensor:
        """The iteration on ``device`` (the RNG step of the masks), created once per device."""
        if self.device_step is None or self.device_step.device != device:
            self.device_step = torch.tensor(self.step, dtype=torch.int64, device=device)
        return self.device_step

    def planned(self, policy, seed: int) -> bool | None:
        """``policy``'s decision for this step when known before the first backward (asked once per
        step), None when it needs the first gradient."""
        if not policy.decides_steps:
            return True
        if self.decision is None or self.decision[0] != self.step:
            planned = policy.planned_sam_step(self.step, seed)
            if planned is None:
                return None
            self.decision = (self.step, planned)
        return self.decision[1]

    def advance(self) -> None:
        """One more iteration, on the host and on the device."""
        _advance_host_step(self)
        if self.device_step is not None:
            self.device_step.add_(1)

    # -------------------------------------------------------------------------- the plan

    def backup(self, param: torch.Tensor) -> torch.Tensor:
        """The backup buffer of ``param`` (allocated once, reallocated if the parameter changed); of its
        local shard for a DTensor."""
        backup = self.backups.get(param)
        local = local_tensor(param)
        if (backup is None or backup.shape != local.shape or backup.dtype != local.dtype
                or backup.device != local.device or not same_layout(backup, local)):
            backup = torch.empty_like(local)  # the parameter's layout (see "layout" in common.py)
            self.backups[param] = backup
        return backup

    def release(self) -> None:
        """The end of an ascent or a descent: the plan lets go of the gradients it collected
        (``StepPlan.release``). NOTE: not in a ``finally``: after an error they are held until the next
        step's collect (a ``finally`` on every step costs more than the rare error path saves)."""
        if self.plan is not None:
            self.plan.release()

    def invalidate(self) -> None:
        self.plan_generation += 1
        self.plan = None

    def plan_key(self, optimizer, kind: str | None) -> tuple:
        """What a step plan depends on besides the parameters' storage and the gradient set (see
        plan.py): cheap to compute, O(param groups).

        NOTE (compile guards): the optimizer is passed, not its groups and state, so that a compiled
        frame guards on them through the optimizer object (a state dict as a frame's own argument is
        guarded down to its parameters' gradients, which are new objects every step)."""
        groups, state = optimizer.param_groups, optimizer.state
        return (self.plan_generation, id(groups), id(state), len(state), tuple(map(id, groups)),
                tuple(len(group["params"]) for group in groups), kind, fused_steps.structure(kind, groups))

    def current_plan(self, optimizer, kind: str | None,
                     may_lack: frozenset[int] = frozenset()) -> tuple[StepPlan, list]:
        """The step plan of ``optimizer`` (rebuilt when stale) and the current local gradients of its
        parameters (None for those in ``may_lack``, ids of parameters sitting out the ascent, that have
        none)."""
        key = self.plan_key(optimizer, kind)
        plan = self.plan
        if plan is not None and plan.is_current(key, optimizer.param_groups):
            grads = plan.grads(may_lack)
            if grads is not None:
                return plan, grads
        groups = optimizer.param_groups
        plan = self.plan = StepPlan(groups, optimizer.state, key, kind, self.backup, optimizer.backend,
                                    device_of(groups), previous=plan)
        return plan, plan.grads()

    # ---------------------------------------------------------------------------- norms

    def norm(self, plan: StepPlan, grads: list[torch.Tensor], weights: list[torch.Tensor] | None = None,
             adaptive_eta: float = 0.0, kept: list[bool] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Global norm and non-finite flag of ``grads`` (zeros on the device when empty; the rows of
        ``kept`` only); over the local shards and all-reduced when the parameters are sharded (FSDP2)."""
        lists = plan.lists_for(grads)
        if grads and lists is not None and (weights is None or weights is plan.local):
            norm, nonfinite = lists.grad_norm(weights is not None, adaptive_eta, kept_mask(kept))
        elif kept is not None:
            weights = select(weights, kept) if weights is not None else None
            return self.norm(plan, select(grads, kept), weights, adaptive_eta)
        elif grads:
            norm, nonfinite = entry.grad_norm(plan.backend, as_list(grads), weights, adaptive_eta)
        else:
            norm = torch.zeros((), dtype=torch.float32, device=plan.device)
            nonfinite = norm.clone()
        group = shard_group(plan.params) if plan.sharded else None
        if group is None:
            return norm, nonfinite
        # NOTE: every rank holds a shard of every parameter, so every rank takes part in each call.
        norm = all_reduce_norm(norm, group)
        dist.all_reduce(nonfinite, op=dist.ReduceOp.MAX, group=group)
        return norm, torch.maximum(nonfinite, (~torch.isfinite(norm)).float())

    def ascent_norm(self, plan: StepPlan, grads: list[torch.Tensor], kept: list[bool] | None,
                    weighting) -> tuple[torch.Tensor, torch.Tensor]:
        """Global norm of the ascent gradients, each group weighted by ``weighting(group)`` (ASAM)."""
        keys = [weighting(g.group) for g in plan.groups]
        if len(set(keys)) <= 1:  # the usual case: one call over the plan's lists
            adaptive, eta = keys[0] if keys else (False, 0.0)
            return self.norm(plan, grads, plan.local if adaptive else None, eta, kept)
        parts: dict[tuple[bool, float], tuple[list, list]] = defaultdict(lambda: ([], []))
        for key, group_plan in zip(keys, plan.groups, strict=True):
            rows = slice(group_plan.start, group_plan.stop)
            mask = kept[rows] if kept is not None else None
            part_grads, part_weights = parts[key]
            part_grads.extend(select(grads[rows], mask))
            part_weights.extend(select(plan.local[rows], mask))
        results = [self.norm(plan, part_grads, part_weights if adaptive else None, eta)
                   for (adaptive, eta), (part_grads, part_weights) in parts.items() if part_grads]
        if len(results) <= 1:
            return results[0] if results else self.norm(plan, [])
        total = torch.stack([norm for norm, _ in results]).square().sum().sqrt()
        flags = torch.stack([flag for _, flag in results] + [(~torch.isfinite(total)).float()])
        return total, flags.amax()

    # ------------------------------------------------------------------------ perturbation

    def context(self, optimizer, plan: StepPlan | None, grads: list | None,
                ascent: Ascent | None) -> StepContext:
        """A policy's view of a step of ``optimizer`` (``policy.StepContext``)."""
        return StepContext(plan, grads, optimizer.state, optimizer.param_groups, optimizer.seed,
                           optimizer.eps, optimizer.backend,
                           ascent.grad_norm if ascent is not None else None,
                           ascent is not None and ascent.plain, _workspace=self)

    def perturb_along(self, plan: StepPlan | None, parts, norm: torch.Tensor, config_of,
                      backend: str | None) -> None:
        """``StepContext.perturb``: a new pending ascent along ``parts``' directions."""
        self.ascent = Ascent(plan, None, norm, torch.zeros_like(norm))
        self.perturb(self.ascent, parts, norm, config_of, backend)

    def perturb(self, ascent: Ascent, parts, norm: torch.Tensor, config_of, backend: str | None) -> None:
        """w += e for each (params, directions, backups, positions, group) of ``parts`` with the
        perturbation ``config_of(group)``, recorded in ``ascent`` call by call (so that a failing call
        leaves the earlier ones restorable); through the op layer when ``ascent.plan`` is None."""
        step = self.rng_step(norm.device)
        plan = ascent.plan
        for params, directions, backups, positions, group in parts:
            config = config_of(group)
            if plan is not None:
                entry.perturb_(plan.backend, params, directions, backups, positions, norm, step, config)
            else:
                ops.perturb_(params, backups, norm, grads=directions, rho=config.rho, eps=config.eps,
                             keep_prob=config.keep_prob, scale_factor=config.scale_factor,
                             normalize=config.normalize, adaptive=config.adaptive,
                             adaptive_eta=config.adaptive_eta, seed=config.seed, step=step,
                             tensor_indices=positions, backend=backend)
            ascent.perturbed.append((params, backups))

    def perturb_plan(self, ascent: Ascent, directions: list, norm: torch.Tensor, config_of,
                     backend: str | None) -> None:
        """``perturb`` over every group of the ascent's plan along ``directions``, without the tensors
        that sit out the ascent (``ascent.kept``); when the directions are the plan's collected gradients,
        through the plan's C++ lists (plan.py), recorded in ``ascent.perturbed_groups``."""
        plan = ascent.plan
        lists = plan.lists_for(directions)
        if lists is None:
            self.perturb(ascent, ascent_parts(plan, directions, ascent.kept), norm, config_of, backend)
            return
        step, mask = self.rng_step(norm.device), kept_mask(ascent.kept)
        for index, group_plan in enumerate(plan.groups):
            plan.backend.perturb_rows(lists, index, norm, step, config_of(group_plan.group), mask)
            ascent.perturbed_groups.append(index)

    def restore(self, ascent: Ascent, backend: str | None) -> None:
        """w = backup for every parameter the ascent perturbed (idempotent: the backups hold w until the
        next ascent)."""
        plan = ascent.plan
        if ascent.perturbed_groups:
            if plan.lists is not None:
                mask = kept_mask(ascent.kept)
                for index in ascent.perturbed_groups:
                    plan.lists.restore(index, mask)
            else:  # NOTE: a copied optimizer's plan has no C++ lists: the same rows through Python lists
                for index in ascent.perturbed_groups:
                    rows = slice(plan.groups[index].start, plan.groups[index].stop)
                    mask = ascent.kept[rows] if ascent.kept is not None else None
                    params = select(plan.local[rows], mask)
                    if params:  # NOTE: a group all of whose rows sat out the ascent moved nothing
                        entry.restore_(plan.backend, params, select(plan.backups[rows], mask))
        for params, backups in ascent.perturbed:
            if plan is not None:
                entry.restore_(plan.backend, params, backups)
            else:  # perturbed outside a step: through the op layer
                ops.restore_(params, backups, backend=backend)


def device_of(groups: list[dict]) -> torch.device:
    """The parameters' device (the op layer takes one device per call)."""
    for group in groups:
        for param in group["params"]:
            return param.device
    return torch.device("cpu")


def ascent_parts(plan: StepPlan, grads: list, kept: list[bool] | None) -> list[tuple]:
    """(params, grads, backups, positions, group) of each group's perturb call, without the tensors
    that sit out the ascent (``kept``)."""
    parts = []
    for group_plan in plan.groups:
        rows = slice(group_plan.start, group_plan.stop)
        part = (plan.local[rows], grads[rows], plan.backups[rows], group_plan.positions)
        if kept is not None:
            part = tuple(select(items, kept[rows]) for items in part)
            if not part[0]:
                continue
        parts.append((*part, group_plan.group))
    return parts
