"""Gradient clipping by the global L2 norm, on the device, sharing SAM's fused norm kernel.

For SAM, clip after the second backward, before ``second_step`` (or ``scaler.step``): the ascent
normalizes its gradient anyway, so clipping before it changes nothing.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable

import torch

from . import ops
from .backends.common import SUPPORTED_DTYPES
from .distributed import all_reduce_norm, local_tensor

__all__ = ["clip_grad_norm_", "grad_norm"]


def _with_grads(parameters) -> list[torch.Tensor]:
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    return [p for p in parameters if p.grad is not None]


def _fused_dtype(grad: torch.Tensor) -> bool:
    """Whether the fused norm kernel serves ``grad``: its sum is fp32, so fp64 gradients (whose norm
    torch computes in fp64) go to ``_foreach_norm``."""
    return grad.dtype in SUPPORTED_DTYPES and grad.dtype != torch.float64


def grad_norm(parameters: torch.Tensor | Iterable[torch.Tensor], *, norm_type: float = 2.0,
              process_group=None, backend: str | None = None) -> torch.Tensor:
    """Global ``norm_type``-norm of the gradients of ``parameters`` (those without one are skipped), a
    0-d tensor on the first parameter's device (fp32, or fp64 when a gradient is fp64), computed without
    a host sync.

    The 2-norm of fp32/fp16/bf16 gradients runs in the fused norm kernel, summed per device; other
    norms and fp64 gradients use torch's multi-tensor ``_foreach_norm``. With ``process_group`` the
    partial norms are all-reduced over it first: the norm of gradients sharded over ranks (FSDP). A
    DTensor contributes its local shard.
    """
    norm_type = _checked_norm_type(norm_type)
    params = _with_grads(parameters)
    device = local_tensor(params[0]).device if params else torch.device("cpu")
    wide = any(local_tensor(p.grad).dtype == torch.float64 for p in params)
    dtype = torch.float64 if wide else torch.float32
    by_device: dict[torch.device, list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)
    for p in params:
        local, grad = local_tensor(p), local_tensor(p.grad)
        by_device[local.device].append((local, grad))
    parts = []
    for pairs in by_device.values():
        fused = [(w, g) for w, g in pairs if norm_type == 2.0 and _fused_dtype(g)]
        rest = [g for w, g in pairs if not (norm_type == 2.0 and _fused_dtype(g))]
        if fused:
            parts.append(ops.grad_norm([w for w, _ in fused], [g for _, g in fused], backend=backend)[0])
        if rest:
            parts.extend(torch._foreach_norm(rest, norm_type))
    if not parts:
        total = torch.zeros((), dtype=dtype, device=device)
    else:
        stacked = torch.stack([part.to(device=device, dtype=dtype) for part in parts])
        total = stacked.amax() if math.isinf(norm_type) else stacked.pow(norm_type).sum().pow(1.0 / norm_type)
    return total if process_group is None else all_reduce_norm(total, process_group, norm_type)


def _checked_norm_type(norm_type) -> float:
    if isinstance(norm_type, bool) or not isinstance(norm_type, (int, float)) or not norm_type > 0:
        raise ValueError(f"norm_type: must be a positive number or inf, got {norm_type!r}")
    return float(norm_type)


def clip_grad_norm_(parameters: torch.Tensor | Iterable[torch.Tensor], max_norm: float,
                    norm_type: float = 2.0, error_if_nonfinite: bool = False, *,
                    process_group=None, backend: str | None = None) -> torch.Tensor:
    """Scale the gradients in place so that their global ``norm_type``-norm is at most ``max_norm``;
    returns the norm before clipping (a 0-d device tensor).

    The rule and arguments are ``torch.nn.utils.clip_grad_norm_``'s: every gradient times
    ``min(1, max_norm / (norm + 1e-6))``, applied on the device. No host sync unless
    ``error_if_nonfinite=True``, which reads the norm once to raise on a non-finite one (torch does the
    same); otherwise a non-finite norm makes the gradients non-finite, and GradScaler or SAM's non-finite
    check then skips the step. ``process_group``: see ``grad_norm``.
    """
    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or not max_norm > 0:
        raise ValueError(f"max_norm: must be a positive number, got {max_norm!r}")
    if not isinstance(error_if_nonfinite, bool):
        raise TypeError(f"error_if_nonfinite: must be True or False, got {error_if_nonfinite!r}")
    params = _with_grads(parameters)
    total = grad_norm(params, norm_type=norm_type, process_group=process_group, backend=backend)
    if not params:
        return total
    if error_if_nonfinite and not bool(torch.isfinite(total)):
        raise RuntimeError(f"clip_grad_norm_: the total norm of order {float(norm_type)} of the gradients "
                           "is non-finite, so it cannot be clipped; set error_if_nonfinite=False to "
                           "let the step be skipped instead")
    coef = torch.clamp(float(max_norm) / (total + 1e-6), max=1.0)
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = defaultdict(list)
    for p in params:
        grad = local_tensor(p.grad)
        groups[(grad.device, grad.dtype)].append(grad)
    for (grad_device, _), grads in groups.items():
        torch._foreach_mul_(grads, coef.to(grad_device))
    return total
