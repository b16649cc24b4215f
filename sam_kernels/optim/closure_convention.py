"""Which closure convention a ``step(closure)`` call follows, told from the gradients it finds.

Two conventions meet in ``optimizer.step(closure)``:

- torch.optim's (Lightning, most loops): the closure zeroes the gradients, computes the loss and calls
  backward; the optimizer calls it as often as it needs. SAM calls it at w and at w + e.
- the most-used SAM implementation's README: the loop runs the first forward and backward itself, then
  ``optimizer.step(closure)`` with a closure that only computes and backpropagates, then ``zero_grad()``.
  Calling that closure at w again would cost a third pass and ascend along the doubled gradient.

The second convention leaves gradients computed at w since the last step (or ``zero_grad``); the first
leaves none, or the ones the last step left behind. SAM records the gradients at the end of each
``step(closure)`` and at ``zero_grad()`` (``GradMarks``), and ``step(closure)`` compares: gradients
that are new objects, or were written in place since, are the first pass.

NOTE (what cannot be told apart): gradients zeroed in place outside the optimizer
(``model.zero_grad(set_to_none=False)``, ``p.grad.zero_()``) look written since the record, so they
count as a first pass; zero them with ``optimizer.zero_grad()`` or with ``set_to_none=True``. After a
two-call step (``first_step``/``second_step``) there is no record; gradients found then are taken as
torch's convention (the closure runs twice), with a one-time warning naming the fix.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Sequence

import torch

from ..backends import native_backend

#: The record taken when no parameter held a gradient (the common case: ``zero_grad()``'s default
#: ``set_to_none=True``, or a new optimizer): any gradient found later is new.
CLEARED = ()


class _Record:
    """What the records share: a copied or unpickled optimizer has none (see ``first_pass_done``)."""

    __slots__ = ()

    def __reduce__(self):
        # NOTE: weak references do not pickle, and a copy's would point at the original's gradients.
        return _no_record, ()

    def __deepcopy__(self, memo: dict) -> None:
        return None


class GradMarks(_Record):
    """Per parameter, a weak reference to its gradient and the gradient's version counter (None for no
    gradient). Weak, so that a cleared gradient is freed; the version counter changes with every
    in-place write, backward's accumulation included. Without the native extension (``NativeMarks``
    otherwise)."""

    __slots__ = ("marks", "params")

    def __init__(self, params: Sequence[torch.Tensor]) -> None:
        # NOTE (per-tensor loop): one weak reference per parameter, taken only by step(closure) and
        # zero_grad(set_to_none=False) when the extension is not built; the two-call style never pays it.
        self.params = tuple(params)
        self.marks = tuple(None if p.grad is None else (weakref.ref(p.grad), p.grad._version)
                           for p in self.params)

    def changed(self, groups: list[dict]) -> bool:
        """Whether any parameter of ``groups`` holds a gradient that is not the recorded one, as
        recorded."""
        params = _params(groups)
        if len(params) != len(self.params) or any(a is not b for a, b in zip(params, self.params)):
            return any(p.grad is not None for p in params)  # a new parameter set: nothing to compare
        for param, mark in zip(params, self.marks):
            grad = param.grad
            if grad is None:
                continue
            if mark is None or mark[0]() is not grad or mark[1] != grad._version:
                return True
        return False


class NativeMarks(_Record):
    """``GradMarks`` taken and compared in C++ (``sam_kernels._C.GradMarks``, csrc/grad_marks.cpp): the
    same record, one pass over the param groups' lists instead of a Python loop per parameter."""

    __slots__ = ("native",)

    def __init__(self, groups: list[dict]) -> None:
        self.native = _NATIVE_MARKS(_param_lists(groups))

    def any(self) -> bool:
        """Whether any parameter held a gradient at the record."""
        return self.native.any()

    def changed(self, groups: list[dict]) -> bool:
        """As ``GradMarks.changed``."""
        return self.native.changed(_param_lists(groups))


#: The extension's record, None when it is not built.
_NATIVE_MARKS = getattr(native_backend._C, "GradMarks", None)


def _param_lists(groups: list[dict]) -> list:
    """Each group's parameters as a list or tuple (what the native record walks; torch.optim keeps a list,
    a user may have assigned another sequence)."""
    return [params if type(params) in (list, tuple) else list(params)
            for params in (group["params"] for group in groups)]


def _params(groups: list[dict]) -> list[torch.Tensor]:
    return [param for group in groups for param in group["params"]]


def _no_record() -> None:
    return None


def record(groups: list[dict]) -> _Record | tuple:
    """The gradients of the parameters of ``groups`` (param groups) as they are now (``CLEARED`` when none
    has one)."""
    if _NATIVE_MARKS is not None and not torch.compiler.is_compiling():
        marks = NativeMarks(groups)
        return marks if marks.any() else CLEARED
    params = _params(groups)
    if all(p.grad is None for p in params):
        return CLEARED
    return GradMarks(params)


def first_pass_done(groups: list[dict], marks: _Record | tuple | None, who: str) -> bool:
    """Whether ``step(closure)`` finds the first pass already run: gradients computed at w since the
    record ``marks``. ``marks`` None (no record since a two-call step) takes torch's convention and warns
    once when gradients are present."""
    if marks is CLEARED:
        return any(p.grad is not None for p in _params(groups))
    if marks is None:
        if any(p.grad is not None for p in _params(groups)):
            _warn_unrecorded(who)
        return False
    return marks.changed(groups)


_warned: set[str] = set()


def _warn_unrecorded(who: str) -> None:
    if who in _warned:
        return
    _warned.add(who)
    warnings.warn(
        f"{who}.step(closure) after a two-call step (first_step/second_step) found gradients it cannot "
        "date, so it follows torch's convention and calls the closure twice. If your loop runs the first "
        "backward itself before step(closure), call optimizer.zero_grad() after each step so that "
        "step(closure) can tell the new gradients from the old ones.", stacklevel=4)
