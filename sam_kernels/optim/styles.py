"""The calling styles the engine drives besides the two-call loop (``first_step``, the user's second
backward, ``second_step``): ``step(closure)`` in either closure convention, ``step()`` from GradScaler,
and one pass per step (MomentumSAM)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

from . import closure_convention, descent
from .workspace import Ascent


def closure_step(engine, run, closure: Callable[[], Any]) -> Any:
    """``engine.step(closure)`` (``run``: its ``Workspace``) in either closure convention (see
    closure_convention.py): torch.optim's, where ``closure`` zeroes the gradients, computes the loss and
    calls backward, runs it at w (inside the ascent pass) and returns that loss; the popular SAM one,
    where the loop already ran the first pass, uses those gradients and returns None. Either way the
    closure runs at w + e on a SAM step, inside ``second_pass()``."""
    if hasattr(engine, "grad_scale") or hasattr(engine, "found_inf"):
        raise RuntimeError("step(closure) under torch.amp.GradScaler is not supported (the scaler "
                           "checks the gradients before the closure runs); use first_step("
                           "grad_scaler=scaler), the second backward, then scaler.step(optimizer)")
    loss = None
    if closure_convention.first_pass_done(engine.param_groups, run.grad_marks, type(engine).__name__):
        _warn_ascent_context_unused(engine, run)
    else:
        parked = run.parked
        with torch.enable_grad(), engine._ascent_pass():
            loss = closure()
        run.check_sum_kept(parked)
    engine.first_step(zero_grad=True)
    remaining_passes(engine, closure)
    engine.second_step()
    run.grad_marks = closure_convention.record(engine.param_groups)
    return loss


def remaining_passes(engine, closure: Callable[[], Any], grad_scaler: Any = None) -> None:
    """After the first ascent step: the passes at the perturbed points, each further ascent step of a
    multi-step policy after its own, then the second pass (none on a plain step of a schedule)."""
    for _ in range(engine.policy.ascent_steps - 1):
        if not engine.needs_second_pass():
            return
        with engine.second_pass():
            closure()
        engine.first_step(zero_grad=True, grad_scaler=grad_scaler)
    if engine.needs_second_pass():
        with engine.second_pass():
            closure()


def _warn_ascent_context_unused(engine, run) -> None:
    """The loop ran the first backward itself, so ``ascent_context`` (DDP's ``no_sync``) could not wrap
    it: say so once."""
    if engine.ascent_context is not None and not run.warned_ascent_context:
        run.warned_ascent_context = True
        warnings.warn("step(closure): the first backward ran before step(closure), outside "
                      "ascent_context, so this ascent used the synced gradient; for a per-worker "
                      "ascent let the closure compute the first pass too (zero_grad() before "
                      "step(closure)) or use first_step/second_step with per_worker_ascent",
                      stacklevel=4)


def scaler_step(engine, run) -> None:
    """``engine.step()`` without a closure: the descent, as ``torch.amp.GradScaler.step`` drives it (its
    ``grad_scale`` and ``found_inf`` handed over as attributes), or after ``first_step()``."""
    if run.ascent is None and (hasattr(engine, "grad_scale") or hasattr(engine, "found_inf")):
        raise TypeError("step() from torch.amp.GradScaler.step without first_step(): SAM needs its "
                        "first pass unscaled by the scaler: call first_step(grad_scaler=scaler) after the "
                        "first backward, the second backward, then scaler.step(optimizer). Under "
                        "Lightning with precision='16-mixed', train with plugins=[sam_kernels."
                        "integrations.lightning.SAMMixedPrecision('16-mixed', 'cuda')] instead of "
                        "precision=")
    if run.ascent is None:
        raise TypeError("step(): SAM needs a closure (it evaluates the loss twice); or call "
                        "first_step() and second_step() around your own backward passes")
    descent.run(engine, run, getattr(engine, "grad_scale", None), getattr(engine, "found_inf", None),
                zero_grad=False, from_step=True)


def one_pass_step(engine, run) -> None:
    """A descent with the current gradients and no second pass (``run``: the engine's ``Workspace``):
    from the pending ascent when a policy perturbed the weights after the last step (MomentumSAM), else a
    plain descent from w."""
    if run.ascent is None:
        plan, _ = engine._plan()
        zero = torch.zeros((), dtype=torch.float32, device=plan.device)
        run.ascent = Ascent(plan, [False] * len(plan.params), zero, zero.clone(), plain=True)
    descent.run(engine, run, None, None, zero_grad=False, from_step=False)
