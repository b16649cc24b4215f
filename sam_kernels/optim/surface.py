"""The engine's torch.optim surface shared with its base optimizer: the param groups and state (the same
objects), ``add_param_group``, and the state dict: the base optimizer's (torch format) plus
``"sam": {"seed", "step"}`` and the policy's entries (``"schedule"``, ``"variant"``), loaded atomically."""

from __future__ import annotations

from typing import Any

from .checks import (
    adopt_group_options,
    check_base_options,
    check_distinct,
    check_group,
    check_state_shapes,
    checked_sam_entry,
)


def state_dict(optimizer, run) -> dict[str, Any]:
    """``optimizer.state_dict()`` (``run``: its ``Workspace``)."""
    state = optimizer.base_optimizer.state_dict()
    if optimizer.capturable and run.device_step is not None:
        # NOTE: replays of a captured graph advance the device step only; read it (one sync, at
        # checkpoint time).
        run.step = int(run.device_step)
    state["sam"] = {"seed": optimizer.seed, "step": run.step, **optimizer.policy.state_dict()}
    return state


def load_state_dict(optimizer, run, state_dict: dict[str, Any]) -> None:
    """``optimizer.load_state_dict(state_dict)``.

    NOTE (atomic load): everything is checked before the optimizer changes: the SAM entry, the policy's
    state, every group's SAM and base options, and each state tensor's shape against its parameter. On an
    error the optimizer is exactly as before (torch's load builds new group and state objects, so the old
    ones are put back).
    """
    state_dict = dict(state_dict)
    seed, step, schedule_state, variant_state = checked_sam_entry(state_dict.pop("sam", None),
                                                                  optimizer.seed, run.step)
    variant_state = optimizer.policy.checked_state(schedule_state, variant_state)
    base = optimizer.base_optimizer
    previous = {"state": base.state, "param_groups": base.param_groups}
    try:
        base.load_state_dict(state_dict)
        share_base(optimizer)
        for index, (group, old) in enumerate(zip(optimizer.param_groups, previous["param_groups"],
                                                  strict=True)):
            adopt_group_options(group, base.defaults, optimizer.defaults)
            check_group(group, index)
            check_base_options(base, group, index, old)
        check_state_shapes(optimizer.param_groups, optimizer.state)
        optimizer._descent_kind()
    except BaseException:
        base.__dict__.update(previous)
        share_base(optimizer)
        raise
    optimizer.seed, run.step, run.decision, run.parked = seed, step, None, None
    if variant_state is not None:
        optimizer.policy.load_variant_state(variant_state)
    run.invalidate()
    if optimizer.capturable and run.device_step is not None:
        run.device_step.fill_(run.step)  # keeps its address for captured graphs
    else:
        run.device_step = None


def share_base(optimizer) -> None:
    """Bind the optimizer's param groups and state to its base optimizer's.

    NOTE: SAM and its base optimizer share the param-group list and the state dict (the same objects), so
    anything that edits one edits the other; rebind after the base rebinds them.
    """
    optimizer.param_groups = optimizer.base_optimizer.param_groups
    optimizer.state = optimizer.base_optimizer.state
    optimizer._shared = (optimizer.param_groups, optimizer.state)


def reshare(optimizer) -> None:
    """Share the groups and state again when either side rebound them (the side that changed wins).

    NOTE: the base optimizer's own load_state_dict (called directly) rebinds its group list and state
    dict, or the user assigned SAM's; SAM's options are then filled in and checked.
    """
    base = optimizer.base_optimizer
    if optimizer.param_groups is base.param_groups and optimizer.state is base.state:
        return
    shared_groups, shared_state = optimizer._shared
    if base.param_groups is shared_groups and base.state is shared_state:
        base.param_groups, base.state = optimizer.param_groups, optimizer.state
    share_base(optimizer)
    for index, group in enumerate(optimizer.param_groups):
        adopt_group_options(group, base.defaults, optimizer.defaults)
        check_group(group, index)


def add_param_group(optimizer, param_group: dict[str, Any]) -> None:
    """``optimizer.add_param_group`` once the base optimizer is attached (SAM's defaults fill the
    missing options; a group that fails its checks is not added)."""
    base = optimizer.base_optimizer
    adopt_group_options(param_group, base.defaults, optimizer.defaults)
    optimizer.invalidate_plan()
    base.add_param_group(param_group)
    try:
        check_group(optimizer.param_groups[-1], len(optimizer.param_groups) - 1)
        check_distinct(optimizer.param_groups)
    except (TypeError, ValueError):
        optimizer.param_groups.pop()
        raise
