"""The fully fused descent: restore the weights and take the base optimizer's step in one op call.

Only ``torch.optim.SGD``, ``Adam`` and ``AdamW`` (exactly those classes, not subclasses, whose ``step``
may do something else) have a fused restore-and-step. The ops read and write the base optimizer's own
state tensors under torch's own keys, so its ``state_dict`` stays loadable by plain torch.optim and the
generic path can take over at any step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .. import ops

#: Options whose value must be a Python number for the fused step (torch also accepts tensors).
_NUMBER_OPTIONS = {"sgd": ("lr", "momentum", "dampening", "weight_decay"),
                   "adam": ("lr", "betas", "eps", "weight_decay")}


def fused_kind(base: torch.optim.Optimizer) -> str | None:
    """``"sgd"`` or ``"adam"`` when ``base``'s class has a fused restore-and-step, else None."""
    if type(base) is torch.optim.SGD:
        return "sgd"
    if type(base) in (torch.optim.Adam, torch.optim.AdamW):
        return "adam"
    return None


def _holds_tensor(value) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    return isinstance(value, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in value)


def unsupported_reason(base: torch.optim.Optimizer) -> str | None:
    """Why the fused step cannot run ``base`` exactly (naming the argument), or None when it can."""
    kind = fused_kind(base)
    if kind is None:
        return (f"base_optimizer: {type(base).__name__} has no fused restore-and-step "
                "(torch.optim.SGD, Adam and AdamW have)")
    for index, group in enumerate(base.param_groups):
        if group.get("differentiable", False):
            return (f"param_groups[{index}]['differentiable']=True: the fused step is not "
                    "differentiable")
        for name in _NUMBER_OPTIONS[kind]:
            if _holds_tensor(group.get(name)):
                return (f"param_groups[{index}]['{name}'] is a tensor: the fused step takes Python "
                        "numbers (a tensor value would need a host sync)")
    return None


class PendingStep:
    """One group's restore-and-step, prepared: ``run`` launches the op, ``commit`` stores the state
    entries it created. NOTE (atomic descent): preparing reads every option and checks every state
    tensor, so ``run`` can only fail on what the op itself finds; nothing enters the optimizer state
    before ``commit``."""

    def __init__(self, launch: Callable[..., None], commit: Callable[[], None]) -> None:
        self._launch, self._commit = launch, commit

    def run(self, *, grad_multiplier: torch.Tensor | None, found_inf: torch.Tensor,
            backend: str | None) -> None:
        self._launch(grad_multiplier=grad_multiplier, found_inf=found_inf, backend=backend)

    def commit(self) -> None:
        self._commit()


def fused_step(kind: str) -> Callable[..., PendingStep]:
    """The restore-and-step preparer of a base optimizer kind (see ``fused_kind``)."""
    return {"sgd": prepare_sgd_step, "adam": prepare_adam_step}[kind]


def _check_state(name: str, tensor, param: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    """A state tensor that fits its parameter (a mismatch means a state dict of another model or
    optimizer)."""
    expected_dtype = param.dtype if dtype is None else dtype
    expected_shape = param.shape if dtype is None else torch.Size([])
    if (not isinstance(tensor, torch.Tensor) or tensor.shape != expected_shape
            or tensor.dtype != expected_dtype or tensor.device != param.device):
        found = (f"{tuple(tensor.shape)} {tensor.dtype} on {tensor.device}"
                 if isinstance(tensor, torch.Tensor) else type(tensor).__name__)
        raise ValueError(f"optimizer state '{name}' of a parameter of shape {tuple(param.shape)}: "
                         f"expected {tuple(expected_shape)} {expected_dtype} on {param.device}, found "
                         f"{found}; the state dict loaded does not belong to this model and optimizer")


def prepare_sgd_step(group: dict, params: Sequence[torch.Tensor], backups: Sequence[torch.Tensor],
                     state: dict) -> PendingStep:
    """Restore ``params`` from ``backups`` and take ``torch.optim.SGD``'s step with ``group``'s options.

    NOTE: torch's SGD keeps ``state[p]['momentum_buffer']`` only when momentum is nonzero, created on a
    parameter's first step; the op creates missing buffers and returns the list, which is stored back.
    A buffer created on a skipped (non-finite) first step stays zero, and the next step then treats it as
    initialized: ``momentum * 0 + (1 - dampening) * g`` instead of torch's ``g``, identical unless
    ``dampening`` is nonzero.
    """
    options = {name: group[name] for name in ("lr", "momentum", "dampening", "weight_decay", "nesterov",
                                              "maximize")}
    buffers = [state[p].get("momentum_buffer") if p in state else None for p in params]
    for param, buffer in zip(params, buffers, strict=True):
        if buffer is not None:
            _check_state("momentum_buffer", buffer, param)
    result: list = []

    def launch(**scalars) -> None:
        result.extend(ops.restore_sgd_step_(params, backups, buffers, **options, **scalars))

    def commit() -> None:
        if options["momentum"] != 0:
            for param, buffer in zip(params, result, strict=True):
                if param.grad is not None:
                    state[param]["momentum_buffer"] = buffer

    return PendingStep(launch, commit)


def _adam_state(param: torch.Tensor, state: dict, amsgrad: bool) -> dict:
    """``param``'s Adam state as the fused op needs it: a copy of the entry, the missing tensors created
    the way torch's fused Adam does (step on the param's device), the existing ones checked."""
    entry = dict(state[param]) if param in state else {}
    if "step" not in entry:
        entry["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
        entry["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        entry["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
    step = entry["step"]
    if not isinstance(step, torch.Tensor) or step.dtype != torch.float32 or step.device != param.device:
        # NOTE: torch's non-fused Adam keeps a CPU (or float64) step; the fused op needs float32 on the
        # parameter's device. Moving it once is harmless to torch, which reads either kind.
        entry["step"] = torch.as_tensor(step, dtype=torch.float32).to(param.device)
    if amsgrad and "max_exp_avg_sq" not in entry:
        entry["max_exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
    _check_state("step", entry["step"], param, torch.float32)
    for key in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ()):
        if key not in entry:
            raise ValueError(f"optimizer state of a parameter of shape {tuple(param.shape)} lacks "
                             f"'{key}'; the state dict loaded does not belong to this optimizer")
        _check_state(key, entry[key], param)
    return entry


def prepare_adam_step(group: dict, params: Sequence[torch.Tensor], backups: Sequence[torch.Tensor],
                      state: dict) -> PendingStep:
    """Restore ``params`` from ``backups`` and take torch's Adam (AdamW) step with ``group``'s options."""
    amsgrad = group["amsgrad"]
    options = {"lr": group["lr"], "betas": group["betas"], "eps": group["eps"],
               "weight_decay": group["weight_decay"],
               "decoupled_weight_decay": group.get("decoupled_weight_decay", False), "amsgrad": amsgrad,
               "maximize": group["maximize"]}
    entries = [_adam_state(p, state, amsgrad) if p.grad is not None else None for p in params]

    def column(key: str) -> list:
        return [entry[key] if entry is not None else None for entry in entries]

    def launch(**scalars) -> None:
        ops.restore_adam_step_(
            params, backups, column("exp_avg"), column("exp_avg_sq"),
            column("max_exp_avg_sq") if amsgrad else None, column("step"), **options, **scalars)

    def commit() -> None:
        for param, entry in zip(params, entries, strict=True):
            if entry is not None:
                state[param].update(entry)

    return PendingStep(launch, commit)
