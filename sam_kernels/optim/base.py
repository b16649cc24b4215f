"""The base optimizer under SAM: built from a class or taken as an instance, refused when SAM cannot
drive it, and stepped with its own hooks."""

from __future__ import annotations

from itertools import chain

import torch
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

#: Base optimizers SAM cannot drive: their step needs what a SAM step cannot give.
REFUSED_BASES = {
    "LBFGS": "LBFGS re-evaluates the closure inside its own step (a line search), which SAM's two "
             "passes cannot provide; use a first-order base optimizer",
    "SparseAdam": "SparseAdam needs sparse gradients and SAM needs dense ones; use Adam or AdamW",
}


def flat_params(params) -> list[torch.Tensor]:
    """The tensors of a ``params`` argument (tensors, dicts of param groups or (name, tensor) pairs)."""
    flat = []
    for item in params:
        items = item["params"] if isinstance(item, dict) else [item]
        items = [items] if isinstance(items, torch.Tensor) else items
        flat.extend(entry[1] if isinstance(entry, tuple) else entry for entry in items)
    return flat


def check_base_class(cls: type) -> None:
    """Refuse, at construction, base optimizers that would fail (or silently misbehave) at a step."""
    if isinstance(cls, type) and getattr(cls, "_is_sam_optimizer", False):
        raise TypeError(f"base_optimizer: {cls.__name__} is a SAM optimizer itself; wrap the base "
                        "optimizer once (SAM(params, torch.optim.SGD, ...))")
    for name, reason in REFUSED_BASES.items():
        refused = getattr(torch.optim, name, None)
        if refused is not None and isinstance(cls, type) and issubclass(cls, refused):
            raise ValueError(f"base_optimizer: {reason}")


def make_base(params, base_optimizer, base_kwargs: dict, foreach: bool | None) -> torch.optim.Optimizer:
    """The base optimizer: built from a class and keyword arguments, or an instance taken as is."""
    check_base_class(base_optimizer if isinstance(base_optimizer, type) else type(base_optimizer))
    if isinstance(base_optimizer, torch.optim.Optimizer):
        if base_kwargs:
            raise TypeError(f"{', '.join(base_kwargs)}: options of the base optimizer go with a class "
                            "(SAM(params, torch.optim.SGD, lr=...)), not with an optimizer instance")
        base = base_optimizer
        if params is not None:
            given = flat_params(params)
            held = [p for group in base.param_groups for p in group["params"]]
            if len(given) != len(held) or any(a is not b for a, b in zip(given, held, strict=False)):
                raise ValueError("params: differ from the base optimizer instance's parameters; pass "
                                 "the same parameters or None")
    elif isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer):
        if params is None:
            raise TypeError("params: required when base_optimizer is an optimizer class")
        base = base_optimizer(params, **base_kwargs)
    else:
        raise TypeError("base_optimizer: expected a torch.optim.Optimizer class (with its options as "
                        f"keyword arguments) or instance, got {base_optimizer!r}")
    if foreach is not None:
        if "foreach" not in base.defaults:
            raise ValueError(f"foreach: {type(base).__name__} has no foreach option")
        base.defaults["foreach"] = foreach
        for group in base.param_groups:
            group["foreach"] = foreach
    return base


def base_step(base: torch.optim.Optimizer) -> None:
    """The base optimizer's step, with its own step hooks but not the global ones.

    NOTE (step hooks): the global hooks run once per SAM step (SAM runs them), so the base class's
    step is called unwrapped, between the base optimizer's own hooks. A step patched onto the base
    instance is called as it is, except an LR scheduler's step counter (SAM marks the base as
    stepped itself).
    """
    patched = base.__dict__.get("step")
    if patched is not None and not getattr(patched, "_wrapped_by_lr_sched", False):
        patched()
        return
    for hook in list(base._optimizer_step_pre_hooks.values()):
        hook(base, (base,), {})
    step = type(base).step
    getattr(step, "__wrapped__", step)(base)
    for hook in list(base._optimizer_step_post_hooks.values()):
        hook(base, (base,), {})


def run_step_hooks(optimizer: torch.optim.Optimizer, which: str) -> None:
    """torch.optim's step pre- or post-hooks of ``optimizer`` (global ones included).

    NOTE (step hooks): the engine runs the pre-hooks in ``first_step`` and the post-hooks in the descent
    (``second_step``, or ``step()`` from GradScaler), so each runs once per SAM step in every calling
    style. A pre-hook's returned arguments have nothing to replace and are ignored.
    """
    if which == "pre":
        hooks = chain(_global_optimizer_pre_hooks.values(), optimizer._optimizer_step_pre_hooks.values())
    else:
        hooks = chain(optimizer._optimizer_step_post_hooks.values(), _global_optimizer_post_hooks.values())
    for hook in hooks:
        hook(optimizer, (optimizer,), {})


def clear_grads(optimizer: torch.optim.Optimizer) -> None:
    """``zero_grad()`` (gradients set to None) without torch.optim's profiler wrapper, which torch.compile
    does not trace: a graph break inside first_step or second_step would split them."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            param.grad = None
