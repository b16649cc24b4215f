"""The step plan: what a SAM step needs, resolved once per parameter set instead of on every step.

A plan holds the parameters that have a gradient (in the optimizer's global order, grouped by param
group), their local tensors (the shards of FSDP2 DTensors), their global tensor indices (the mask
contract), their backups, the resolved backend and, for the fully fused descent, the base optimizer's
state tensors gathered and checked. A step then collects the current gradients in one pass and hands
prebuilt lists to the backend: no op-layer validation, no backend resolution, no environment read.

NOTE (invalidation): a plan is rebuilt when anything it holds may have changed:
  * the param groups: ``add_param_group`` and ``load_state_dict`` bump the optimizer's plan generation,
    the plan key holds the identities of the group list and of each group dict and each group's
    parameter count, and the parameters' identities are compared at every ascent (one C-level pass);
  * a parameter's identity, shape, dtype, device or storage (``model.to``, replacing ``.data``, FSDP2
    resharding): the data pointers of the local tensors are compared at every ascent (one C-level
    pass); shape, dtype and device do not change without a new storage;
  * the set of parameters holding a gradient: checked while the gradients are collected;
  * the optimizer state tensors: created by the fused step (stored by its commit, which updates the
    plan's lists), loaded (``load_state_dict``, or a new state dict object) or cleared (the number of
    state entries is in the key); an entry replaced by hand in ``optimizer.state`` is not seen: call
    ``optimizer.invalidate_plan()`` after doing that;
  * the options that decide the fused kernels' operand lists (SGD momentum on or off, AMSGrad): in the
    key.
NOTE (C++ lists): on the native backend a plan also holds its lists on the C++ side
(``native_backend.step_lists``, csrc/step_lists.cpp): the parameters, backups, tensor indices and each
group's fused-step state. A step then reads the gradients there (``grads``, one call that also runs the
quick layout check), and the ops over the plan's own rows take their lists there (``lists_for``), so a
step crosses into C++ a constant number of times instead of converting every list of every op call
(ESAM's rows that sit out the ascent as a byte mask, ``kept_mask``). The identity and storage checks
above run there too. Lists that are not the plan's own (a policy's directions) go through Python lists
as before.

Hyper-parameters (lr, rho, betas, ...) are read from the param groups at every step, so LR schedulers and
edits of a group's options act at once.

NOTE (gradients): torch checks every ``.grad`` assignment against its parameter's shape, dtype and
device, so a gradient collected for a planned parameter can only differ from it in layout. When every
planned parameter is contiguous the plan checks that every gradient is too (a C-level pass); otherwise
(channels_last models) it compares the gradients' strides with the parameters' (one pass; autograd gives
a gradient its parameter's strides), then, when they differ, each pair by ``same_layout``; the full,
named checks run only when that fails.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .. import backends
from ..backends.common import SUPPORTED_DTYPE_NAMES, SUPPORTED_DTYPES, is_dense, same_layout
from ..distributed import DTensor, local_tensor
from . import fused_steps
from .gradients import Gradients

#: ``id(None)``: NOTE: ``id(None) in map(id, grads)`` finds a missing gradient at C speed (``None in
#: grads`` would call each tensor's ``__eq__``).
_NONE_ID = id(None)

#: ``StepLists.collect``'s status bits (csrc/step_lists.cpp): the plan is stale; a gradient failed the
#: quick layout check (the named checks decide); some gradients are missing (allowed by ``may_lack``).
_STALE, _CHECK, _MISSING = 1, 2, 4


def kept_mask(kept: list[bool] | None) -> bytes | None:
    """``kept`` (the rows that take part in an ascent) as the C++ lists take it: one byte per row."""
    return None if kept is None else bytes(kept)

#: Launch tables a Triton plan keeps per param group: each of the step's ops (norm, perturb, restore,
#: descent) per dtype, with room for ESAM's per-step subsets.
TABLES_PER_GROUP = 16


@dataclass
class GroupPlan:
    """The planned part of one param group: ``params[start:stop]`` of the plan."""

    group: dict
    index: int
    start: int
    stop: int
    #: Global tensor indices of the group's planned parameters (the mask contract).
    positions: list[int]
    #: The fused descent's prepared state (``fused_steps.GroupState``), or None on the generic path.
    state: Any = None


class StepPlan:
    """The resolved parameter set of one optimizer; see the module docstring for when it is rebuilt."""

    def __init__(self, groups: list[dict], state: dict, key: tuple, kind: str | None, backup,
                 backend: str | None, default_device: torch.device, previous: StepPlan | None = None) -> None:
        self.key = key
        self.kind = kind
        self.params: list[torch.Tensor] = []
        self.groups: list[GroupPlan] = []
        self.without_grad: list[torch.Tensor] = []
        offset = 0
        for index, group in enumerate(groups):
            start, positions = len(self.params), []
            for position, param in enumerate(group["params"]):
                if param.grad is None:
                    self.without_grad.append(param)
                    continue
                _check_param(param, index, position)
                self.params.append(param)
                positions.append(offset + position)
            offset += len(group["params"])
            if positions:
                self.groups.append(GroupPlan(group, index, start, len(self.params), positions))
        self.sharded = any(isinstance(p, DTensor) for p in self.params)
        self.local = [local_tensor(p) for p in self.params] if self.sharded else self.params
        self.device = self.params[0].device if self.params else default_device
        for param in self.local[1:]:
            if param.device != self.device:
                raise ValueError(f"params: on {param.device} and {self.device}; SAM needs every "
                                 "parameter on one device")
        self.pointers = self._pointers()
        #: Every planned parameter is contiguous: the gradients' layout check is one C-level pass.
        self.contiguous = all(map(torch.Tensor.is_contiguous, self.local))
        #: The parameters' strides, which autograd gives their gradients (checked in one pass otherwise).
        self.strides = None if self.contiguous else list(map(torch.Tensor.stride, self.local))
        self.param_ids = _param_ids(groups)
        self.backend_name, _ = backends.resolve(self.device, backend)
        self._tables_backend = self._triton_tables(previous)
        #: ``backup(param)``: the backup buffer of a parameter (the optimizer's, allocated once).
        self.backups = [backup(p) for p in self.params]
        #: The plan's lists on the C++ side (see "C++ lists" above), or None.
        self.lists = self._step_lists(groups)
        #: The gradients of the last ``grads()`` while ``lists`` holds them (``lists_for``).
        self.collected: Gradients | None = None
        self.grads()
        if kind is not None:
            for index, group_plan in enumerate(self.groups):
                params = self.params[group_plan.start:group_plan.stop]
                group_plan.state = fused_steps.gather_state(kind, group_plan.group, params, state)
                if self.lists is not None:
                    group_plan.state.prepare(self.lists, index)

    def _step_lists(self, groups: list[dict]):
        """The backend's C++ copy of the plan's lists (the native backend's ``step_lists``), or None: other
        backends, sharded parameters, and plans built while compiling use Python lists."""
        make = getattr(backends.get(self.backend_name), "step_lists", None)
        if make is None or self.sharded or torch.compiler.is_compiling():
            return None
        bounds = [row for group_plan in self.groups for row in (group_plan.start, group_plan.stop)]
        positions = [index for group_plan in self.groups for index in group_plan.positions]
        return make([group["params"] for group in groups], self.params, self.without_grad, self.backups,
                    bounds, positions, self.contiguous)

    def lists_for(self, grads) -> Any:
        """The C++ lists when ``grads`` is the list the last ``grads()`` collected through them (the ops
        can then take their gradients there), else None."""
        if grads is None or grads is not self.collected or torch.compiler.is_compiling():
            return None
        return self.lists

    def release(self) -> None:
        """Let go of the collected gradients (at a pass's end), so that ``zero_grad`` frees them."""
        if self.collected is not None:
            self.collected.expire()
            self.collected = None
            self.lists.release()

    def _triton_tables(self, previous: StepPlan | None):
        """The Triton backend over the optimizer's own launch tables, sized to its working set (a few
        tables per op, param group and dtype); None for the other backends, which need no tables.

        NOTE: a rebuilt plan takes over its predecessor's tables (keyed by content, so those of tensors
        that did not change, e.g. after the first step created the state, stay valid)."""
        if self.backend_name != "triton":
            return None
        capacity = TABLES_PER_GROUP * (len(self.groups) + 1)
        if previous is not None and previous._tables_backend is not None:
            previous._tables_backend.tables.capacity = capacity
            return previous._tables_backend
        return backends.get("triton").PlanBackend(capacity)

    def __getstate__(self) -> dict:
        """A pickled or copied plan drops its launch tables (a cache) and its C++ lists, and finds its
        backend by name again, so unpickling needs no Triton (a copy's parameters are new objects, so its
        plan is rebuilt, lists included, at its first step)."""
        state = dict(self.__dict__)
        state.update(_tables_backend=None, lists=None, collected=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._tables_backend = self._triton_tables(None)

    def _strides_match(self, grads: Sequence[torch.Tensor | None]) -> bool:
        """Every present gradient laid out like its (not all contiguous) parameters: the strides in one
        pass, then pair by pair only when they differ (a size-1 dimension's stride may)."""
        if not _has_none(grads) and list(map(torch.Tensor.stride, grads)) == self.strides:
            return True
        return all(g is None or same_layout(g, p) for g, p in zip(grads, self.local))

    @property
    def backend(self):
        """The backend (a module looked up by name, so a plan pickles and deep-copies; for Triton the
        plan's tables-owning wrapper)."""
        return self._tables_backend or backends.get(self.backend_name)

    def _pointers(self) -> tuple[int, ...]:
        if torch.compiler.is_compiling():
            return ()  # fake tensors have no addresses; dynamo guards on the tensors themselves
        return tuple(map(torch.Tensor.data_ptr, self.local))

    def grads(self, may_lack: frozenset[int] = frozenset()) -> list[torch.Tensor | None] | None:
        """The planned parameters' current (local) gradients, checked (``check_grads``), or None when the
        plan is stale: a planned parameter has none (unless its id is in ``may_lack``: ESAM's dropped
        tensors, whose ascent gradient autograd skipped), or a parameter left out of the plan has gained
        one. With C++ lists the gradients are read and quick-checked there (one call)."""
        if self.lists is not None and not torch.compiler.is_compiling():
            self.release()
            status, missing = self.lists.collect(bool(may_lack))
            if status & _STALE or any(id(self.params[row]) not in may_lack for row in missing):
                self.lists.release()
                return None
            grads = self.collected = Gradients(self.lists, len(self.params))
            if status & _CHECK:
                self.check_grads(grads)
            return grads
        grads = self._python_grads(may_lack)
        self.check_grads(grads)
        return grads

    def _python_grads(self, may_lack: frozenset[int]) -> list[torch.Tensor | None] | None:
        """``grads`` over Python lists (unchecked)."""
        grads = [p.grad for p in self.params]
        if _has_none(grads) and (not may_lack or any(
                g is None and id(p) not in may_lack for p, g in zip(self.params, grads))):
            return None
        if self.without_grad and any(p.grad is not None for p in self.without_grad):
            return None
        if self.sharded:
            return [local_tensor(g) if g is not None else None for g in grads]
        return grads

    def is_current(self, key: tuple, groups: list[dict]) -> bool:
        """Whether the plan still describes the optimizer: the same key, the same parameter objects, the
        same storage (the gradient set is checked by ``grads``)."""
        if key != self.key:
            return False
        if self.lists is not None and not torch.compiler.is_compiling():
            return self.lists.current([group["params"] for group in groups])
        return _param_ids(groups) == self.param_ids and self._pointers() == self.pointers

    def check_grads(self, grads: Sequence[torch.Tensor] | None) -> None:
        """Dense gradients laid out like their parameters (see "gradients" above); the named checks only
        when the quick check fails."""
        if grads is None:
            return
        try:
            if self.contiguous:
                present = [g for g in grads if g is not None] if _has_none(grads) else grads
                if all(map(torch.Tensor.is_contiguous, present)):
                    return
            elif self._strides_match(grads):
                return
        except RuntimeError:  # sparse tensors have no strides
            pass
        for group_plan in self.groups:
            for slot in range(group_plan.start, group_plan.stop):
                if grads[slot] is None:
                    continue
                _check_grad(grads[slot], self.local[slot], group_plan.index,
                            _position_in_group(group_plan.group, self.params[slot]))


def _has_none(items: Sequence) -> bool:
    """Whether any item is None: one C-level pass over ids, or, under torch.compile, identity tests.

    NOTE (compile guards): dynamo turns ``id(tensor)`` into a guard on that tensor object, and a
    gradient is a new object after every ``zero_grad(set_to_none=True)``, so ids of gradients would
    recompile the step every time."""
    if torch.compiler.is_compiling():
        return any(item is None for item in items)
    return _NONE_ID in map(id, items)


def _param_ids(groups: list[dict]) -> list[int]:
    """Identities of every parameter of every group, in order (one C-level pass)."""
    return list(map(id, itertools.chain.from_iterable(group["params"] for group in groups)))


def _position_in_group(group: dict, param: torch.Tensor) -> int:
    for position, candidate in enumerate(group["params"]):
        if candidate is param:
            return position
    return -1


def _check_param(param: torch.Tensor, group_index: int, position: int) -> None:
    where = f"param_groups[{group_index}]['params'][{position}]"
    local = local_tensor(param)
    if local.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{where}: dtype {local.dtype} is not supported; use {SUPPORTED_DTYPE_NAMES}")
    if not local.is_contiguous() and not is_dense(local):
        raise ValueError(f"{where}: a strided view with gaps or overlaps is not supported (any dense "
                         "layout is, channels_last included); make the parameter dense "
                         "(param.data = param.data.contiguous())")


def _check_grad(grad: torch.Tensor, param: torch.Tensor, group_index: int, position: int) -> None:
    where = f"param_groups[{group_index}]['params'][{position}]"
    if grad.layout != torch.strided:
        raise ValueError(f"{where}: sparse gradient; SAM needs dense gradients (e.g. "
                         "nn.Embedding(sparse=False))")
    if not is_dense(grad) or not same_layout(grad, param):
        raise ValueError(f"{where}: its gradient has strides {grad.stride()}, the parameter "
                         f"{param.stride()}; the kernels need a gradient laid out like its parameter (a "
                         "gradient hook, a custom autograd Function or code that assigns .grad returned "
                         "another layout); return or assign torch.empty_like(param).copy_(grad)")
