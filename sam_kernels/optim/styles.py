"""The calling styles the engine drives besides the two-call loop (``first_step``, the user's second
backward, ``second_step``): torch.optim's closure convention, and one pass per step (MomentumSAM)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .bn import freeze_bn_stats
from .workspace import Ascent


def closure_step(engine, closure: Callable[[], Any]) -> Any:
    """``engine.step(closure)``: ``closure`` zeroes the gradients, computes the loss, calls backward and
    returns the loss; it runs at w (inside the ascent pass) and, on a SAM step, at w + e with BatchNorm
    statistics frozen. Returns the loss at w."""
    if hasattr(engine, "grad_scale") or hasattr(engine, "found_inf"):
        raise RuntimeError("step(closure) under torch.amp.GradScaler is not supported (the scaler "
                           "checks the gradients before the closure runs); use first_step("
                           "grad_scaler=scaler), the second backward, then scaler.step(optimizer)")
    with torch.enable_grad(), engine._ascent_pass():
        loss = closure()
    engine.first_step(zero_grad=True)
    if engine.needs_second_pass():
        with engine._restoring_on_error(), torch.enable_grad(), freeze_bn_stats():
            closure()
    engine.second_step()
    return loss


def one_pass_step(engine, run) -> None:
    """A descent with the current gradients and no second pass (``run``: the engine's ``Workspace``):
    from the pending ascent when a policy perturbed the weights after the last step (MomentumSAM), else a
    plain descent from w."""
    if run.ascent is None:
        plan, _ = engine._plan()
        zero = torch.zeros((), dtype=torch.float32, device=plan.device)
        run.ascent = Ascent(plan, [False] * len(plan.params), zero, zero.clone(), plain=True)
    engine._descend(None, None)
