"""Micro-batch SAM (m-sharpness, Foret et al. 2021, section 4.1 of arXiv 2010.01412): a batch taken as k
micro-batches, each with its own ascent, second pass and restore; the descent on the sum of their SAM
gradients, as plain gradient accumulation sums the micro-batches' gradients (scale the loss by 1/k, as
for accumulation, to descend on their mean).

NOTE (memory): one backup and the running sum, nothing else. The sum is the parameters' own ``.grad``
tensors: ``accumulate()`` restores w and parks them (``Workspace.parked``) while the next micro-batch
takes its first gradient into fresh ``.grad`` tensors; that micro-batch's ascent puts the parked sum back
as ``.grad`` (the first gradients are dropped), so its second backward adds to the sum in place. Under
DDP the last micro-batch's synced backward therefore reduces the whole sum, as with plain accumulation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from . import combinations
from .base import clear_grads
from .styles import remaining_passes
from .workspace import DROPPED_SUM, Parked


def park(engine, run) -> None:
    """``engine.accumulate()`` (``run``: its ``Workspace``): w restored, the summed gradients parked."""
    ascent, policy = run.ascent, engine.policy
    if ascent is None:
        raise RuntimeError("accumulate(): call it after first_step() and the micro-batch's second "
                           "backward; the last micro-batch ends with second_step() (or scaler.step)")
    combination = combinations.combination_of(policy, engine.base_optimizer, engine.fused, engine.foreach,
                                              engine.capturable, amp=ascent.grad_scaler is not None,
                                              accumulate=True)
    row = combinations.refusal(combination)
    if row is not None:
        engine._abandon_ascent()
        row.raise_for(combination)
    if not ascent.plain and ascent.count < policy.ascent_steps:
        engine._abandon_ascent()
        raise RuntimeError(f"accumulate(): {policy.name} takes {policy.ascent_steps} ascent steps; call "
                           "first_step() after each of them")
    with torch.no_grad():
        run.restore(ascent, engine.backend)
    ascent.unstash()
    params = engine._params()
    # NOTE (per-tensor loop): ``.grad`` is an attribute of each parameter, so parking and handing back
    # the sum visits each parameter once per micro-batch, as ``zero_grad()`` does; no tensor data moves.
    run.parked = Parked([(param, param.grad) for param in params if param.grad is not None],
                        ascent.nonfinite)
    run.ascent = None
    clear_grads(engine)


def unpark(engine, run, ascent) -> None:
    """At a micro-batch's ascent: the parked sum becomes ``.grad`` again (a SAM step: the first
    gradients were cleared, the second backward adds to it; a plain step of a schedule: added to the
    first gradients, which are this micro-batch's descent gradient) and its flag joins the ascent's."""
    parked, run.parked = run.parked, None
    if parked is None:
        return
    ascent.holds_sum = not ascent.plain
    ascent.nonfinite = torch.maximum(ascent.nonfinite, parked.nonfinite)
    adding = [(param.grad, total) for param, total in parked.grads if ascent.plain and param.grad is not None]
    if adding:
        torch._foreach_add_([grad for grad, _ in adding], [total for _, total in adding])
    for param, total in parked.grads:  # NOTE (per-tensor loop): see park
        if param.grad is None:
            param.grad = total


def drop_sum(run) -> None:
    """``zero_grad()``: a parked sum is dropped with the gradients (a new accumulation starts), but
    between a micro-batch's ascent and its descent the gradients are the sum itself: refused."""
    if run.ascent is not None and run.ascent.holds_sum:
        raise RuntimeError(DROPPED_SUM)
    run.parked = None


def micro_batch(engine, closure: Callable[[], Any], last: bool, grad_scaler: Any = None) -> Any:
    """One micro-batch with both passes driven by ``closure`` (computes the loss and calls backward; it
    must not zero the gradients): the first pass at w, the ascent (each step of a multi-step policy),
    the second pass, then the descent when ``last`` else ``accumulate()`` (``grad_scaler``: the
    GradScaler that scales the closure's loss, for ``first_step``). Returns the loss at w."""
    if engine._run.ascent is not None:
        raise RuntimeError("accumulate(closure): the weights are perturbed by a pending first_step(); "
                           "finish that step first")
    parked = engine._run.parked
    with torch.enable_grad(), engine._ascent_pass():
        loss = closure()
    engine._run.check_sum_kept(parked)
    engine.first_step(zero_grad=True, grad_scaler=grad_scaler)
    remaining_passes(engine, closure, grad_scaler)
    if last:
        engine.second_step()
    else:
        engine.accumulate()
    return loss


def micro_batch_step(engine, closure: Callable[[Any], Any], micro_batches: Iterable) -> torch.Tensor | None:
    """``engine.micro_batch_step``: one SAM step over ``micro_batches`` (see ``micro_batch``), the
    gradients cleared before each; returns the sum of the losses at w (detached; None when the closure
    returns none)."""
    batches = list(micro_batches)
    if not batches:
        raise ValueError("micro_batches: empty; pass at least one micro-batch")
    total = None
    for index, batch in enumerate(batches):
        clear_grads(engine)
        loss = micro_batch(engine, lambda batch=batch: closure(batch), last=index == len(batches) - 1)
        if isinstance(loss, torch.Tensor):
            total = loss.detach() if total is None else total + loss.detach()
    return total
