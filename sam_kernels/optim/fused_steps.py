"""The fully fused descent: restore the weights and take the base optimizer's step in one op call.

Only ``torch.optim.SGD``, ``Adam`` and ``AdamW`` (exactly those classes, not subclasses, whose ``step``
may do something else) have a fused restore-and-step. The ops read and write the base optimizer's own
state tensors under torch's own keys, so its ``state_dict`` stays loadable by plain torch.optim and the
generic path can take over at any step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..backends import entry
from ..backends.common import AdamConfig, SgdConfig, number_options, same_layout
from ..distributed import shard_group

#: The config of each fused step; the options it reads as numbers must be Python numbers (torch also
#: accepts tensors).
_CONFIGS = {"sgd": SgdConfig, "adam": AdamConfig}


def fused_kind(base: torch.optim.Optimizer) -> str | None:
    """``"sgd"`` or ``"adam"`` when ``base``'s class has a fused restore-and-step, else None."""
    return class_kind(type(base))


def class_kind(cls: type) -> str | None:
    """``"sgd"`` or ``"adam"`` for exactly the classes with a fused restore-and-step, else None."""
    if cls is torch.optim.SGD:
        return "sgd"
    if cls in (torch.optim.Adam, torch.optim.AdamW):
        return "adam"
    return None


def _holds_tensor(value) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    return isinstance(value, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in value)


def unsupported_reason(base: torch.optim.Optimizer, policy=None) -> str | None:
    """Why the fused step cannot run ``base`` exactly (naming the argument), or None when it can."""
    kind = fused_kind(base)
    if kind is None:
        return (f"base_optimizer: {type(base).__name__} has no fused restore-and-step "
                "(torch.optim.SGD, Adam and AdamW have)")
    if policy is not None and kind not in policy.fused_ops:
        return f"{policy.name} has no fused {kind} step (it has {', '.join(policy.fused_ops) or 'none'})"
    for index, group in enumerate(base.param_groups):
        if group.get("differentiable", False):
            return (f"param_groups[{index}]['differentiable']=True: the fused step is not "
                    "differentiable")
        for name in number_options(_CONFIGS[kind]):
            if _holds_tensor(group.get(name)):
                return (f"param_groups[{index}]['{name}'] is a tensor: the fused step takes Python "
                        "numbers (a tensor value would need a host sync)")
    if shard_group(p for group in base.param_groups for p in group["params"]) is not None:
        return "the parameters are sharded DTensors (FSDP2); the base optimizer's own step updates them"
    return None


def descent_kind(base: torch.optim.Optimizer, policy, fused: bool | None, foreach: bool | None) -> str | None:
    """``"sgd"``/``"adam"`` for the fully fused descent, None for the generic path (``fused=True``: an
    error naming what it cannot honour)."""
    if fused is False or foreach:
        return None
    reason = unsupported_reason(base, policy)
    if reason is None:
        return fused_kind(base)
    if fused:
        raise ValueError(f"fused=True: {reason}; use fused=None (the generic path when the fused one cannot "
                         "run) or fused=False")
    return None


def structure(kind: str | None, groups: Sequence[dict]) -> tuple:
    """The group options that decide the fused kernels' operand lists (part of the step plan's key)."""
    if kind == "sgd":
        return tuple(group["momentum"] != 0 for group in groups)
    if kind == "adam":
        return tuple(bool(group["amsgrad"]) for group in groups)
    return ()


def gather_state(kind: str, group: dict, params: Sequence[torch.Tensor], state: dict):
    """The state of ``group``'s fused step over ``params`` (every one holds a gradient), checked."""
    return {"sgd": SgdGroupState, "adam": AdamGroupState}[kind](group, params, state)


def _in_param_layout(tensor, param: torch.Tensor):
    """``tensor``, or a copy of it laid out like ``param`` when only the layout differs (a checkpoint of a
    contiguous model loaded into a channels_last one; see "layout" in ``backends/common.py``)."""
    if (isinstance(tensor, torch.Tensor) and tensor.shape == param.shape and tensor.dtype == param.dtype
            and tensor.device == param.device and not same_layout(tensor, param)):
        return torch.empty_like(param).copy_(tensor)
    return tensor


def _check_state(name: str, tensor, param: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    """A state tensor that fits its parameter (a mismatch means a state dict of another model or
    optimizer)."""
    expected_dtype = param.dtype if dtype is None else dtype
    expected_shape = param.shape if dtype is None else torch.Size([])
    if (not isinstance(tensor, torch.Tensor) or tensor.shape != expected_shape
            or tensor.dtype != expected_dtype or tensor.device != param.device
            or (dtype is None and not same_layout(tensor, param))):
        found = (f"{tuple(tensor.shape)} {tensor.dtype} on {tensor.device} with strides {tensor.stride()}"
                 if isinstance(tensor, torch.Tensor) else type(tensor).__name__)
        raise ValueError(f"optimizer state '{name}' of a parameter of shape {tuple(param.shape)}: "
                         f"expected a {tuple(expected_shape)} {expected_dtype} on {param.device} laid "
                         f"out like the parameter, found {found}; the state dict loaded does not belong "
                         "to this model and optimizer")


class _GroupState:
    """What the fused steps' group states share: the plan's C++ lists, when it has them (``prepare``)."""

    #: The plan's C++ lists (plan.py) and this group's index there.
    lists = None
    index = 0

    def __getstate__(self) -> dict:
        """A copied or pickled state drops the C++ lists (its plan drops them too)."""
        state = dict(self.__dict__)
        state.pop("lists", None)
        return state


class SgdGroupState(_GroupState):
    """``torch.optim.SGD``'s state of one group, as the fused restore-and-step takes it.

    NOTE: torch's SGD keeps ``state[p]['momentum_buffer']`` only when momentum is nonzero, created on a
    parameter's first step (``buf = g``). Missing buffers are created here, flagged as first steps, and
    stored in the optimizer state by ``commit`` once the step ran (as is a copy of a buffer in another
    layout than its parameter's, ``created`` lists both). A buffer created on a skipped
    (non-finite) first step stays zero, and the next step then treats it as initialized:
    ``momentum * 0 + (1 - d) * g`` (``d`` the group's damping) instead of torch's ``g``, identical for an
    undamped momentum.
    """

    def __init__(self, group: dict, params: Sequence[torch.Tensor], state: dict) -> None:
        self.params = list(params)
        self.buffers: list[torch.Tensor] = []
        self.first_step = [0] * len(params)
        self.created: list[int] = []
        if group["momentum"] == 0:
            return
        for index, param in enumerate(params):
            buffer = state[param].get("momentum_buffer") if param in state else None
            if buffer is None:
                buffer = torch.zeros_like(param)
                self.first_step[index] = 1
                self.created.append(index)
            else:
                relaid = _in_param_layout(buffer, param)
                _check_state("momentum_buffer", relaid, param)
                if relaid is not buffer:
                    buffer = relaid
                    self.created.append(index)
            self.buffers.append(buffer)

    config = staticmethod(SgdConfig.of_group)

    def prepare(self, lists, index: int) -> None:
        """Hand the group's state lists to the plan's C++ lists (again after ``commit`` changed them)."""
        self.lists, self.index = lists, index
        lists.set_state(index, self.buffers, [], [], [], self.first_step)

    def run(self, backend, params, backups, grads, config: SgdConfig, grad_multiplier, found_inf) -> None:
        entry.restore_sgd_step_(backend, params, backups, grads, self.buffers, self.first_step, config,
                                grad_multiplier, found_inf)

    def run_prepared(self, config: SgdConfig, grad_multiplier, found_inf, kept: bytes | None) -> None:
        """``run`` over the plan's own rows, its lists and collected gradients taken in C++ (``kept``:
        ``plan.kept_mask`` of the rows the ascent perturbed)."""
        self.lists.restore_sgd_step(self.index, config.values(), grad_multiplier, found_inf, kept)

    def commit(self, state: dict) -> None:
        if not self.created:
            return
        for index in self.created:
            state[self.params[index]]["momentum_buffer"] = self.buffers[index]
            self.first_step[index] = 0
        self.created = []
        if self.lists is not None:
            self.prepare(self.lists, self.index)


class AdamGroupState(_GroupState):
    """``torch.optim.Adam``/``AdamW``'s state of one group, as the fused restore-and-step takes it:
    missing entries are created the way torch's fused Adam creates them (the step on the parameter's
    device) and stored by ``commit`` once the step ran; existing ones are checked."""

    def __init__(self, group: dict, params: Sequence[torch.Tensor], state: dict) -> None:
        self.params = list(params)
        self.amsgrad = bool(group["amsgrad"])
        self.pending: list[tuple[torch.Tensor, dict]] = []
        columns: dict[str, list] = {"exp_avg": [], "exp_avg_sq": [], "max_exp_avg_sq": [], "step": []}
        for param in params:
            entry = self._entry(param, state)
            for key, column in columns.items():
                if key != "max_exp_avg_sq" or self.amsgrad:
                    column.append(entry[key])
        self.exp_avgs, self.exp_avg_sqs = columns["exp_avg"], columns["exp_avg_sq"]
        self.max_exp_avg_sqs = columns["max_exp_avg_sq"] if self.amsgrad else None
        self.steps = columns["step"]

    def _entry(self, param: torch.Tensor, state: dict) -> dict:
        current = state.get(param, {})
        entry = dict(current)
        if "step" not in entry:
            entry["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
            entry["exp_avg"] = torch.zeros_like(param)
            entry["exp_avg_sq"] = torch.zeros_like(param)
        step = entry["step"]
        if not isinstance(step, torch.Tensor) or step.dtype != torch.float32 or step.device != param.device:
            # NOTE: torch's non-fused Adam keeps a CPU (or float64) step; the fused op needs float32 on
            # the parameter's device. Moving it once is harmless to torch, which reads either kind.
            entry["step"] = torch.as_tensor(step, dtype=torch.float32).to(param.device)
        if self.amsgrad and "max_exp_avg_sq" not in entry:
            entry["max_exp_avg_sq"] = torch.zeros_like(param)
        _check_state("step", entry["step"], param, torch.float32)
        for key in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if self.amsgrad else ()):
            if key not in entry:
                raise ValueError(f"optimizer state of a parameter of shape {tuple(param.shape)} lacks "
                                 f"'{key}'; the state dict loaded does not belong to this optimizer")
            entry[key] = _in_param_layout(entry[key], param)
            _check_state(key, entry[key], param)
        if any(current.get(key) is not value for key, value in entry.items()):
            self.pending.append((param, entry))
        return entry

    config = staticmethod(AdamConfig.of_group)

    def prepare(self, lists, index: int) -> None:
        """Hand the group's state lists to the plan's C++ lists (they do not change after)."""
        self.lists, self.index = lists, index
        lists.set_state(index, self.exp_avgs, self.exp_avg_sqs, self.max_exp_avg_sqs or [], self.steps, [])

    def run_prepared(self, config: AdamConfig, grad_multiplier, found_inf, kept: bytes | None) -> None:
        """``run`` over the plan's own rows (the step counters advance in C++ as in ``entry``)."""
        if config.amsgrad != self.amsgrad:
            raise RuntimeError("amsgrad changed without a new step plan")
        self.lists.restore_adam_step(self.index, config.values(), grad_multiplier, found_inf, kept)

    def run(self, backend, params, backups, grads, config: AdamConfig, grad_multiplier, found_inf) -> None:
        if config.amsgrad != self.amsgrad:
            raise RuntimeError("amsgrad changed without a new step plan")
        entry.restore_adam_step_(backend, params, backups, grads, self.exp_avgs, self.exp_avg_sqs,
                                 self.max_exp_avg_sqs, self.steps, config, grad_multiplier, found_inf)

    def commit(self, state: dict) -> None:
        for param, created in self.pending:
            state[param].update(created)
        self.pending = []
