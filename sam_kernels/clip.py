"""Gradient clipping by the global L2 norm, on the device, sharing SAM's fused norm kernel.

For SAM, clip after the second backward, before ``second_step`` (or ``scaler.step``): the ascent
normalizes its gradient anyway, so clipping before it changes nothing.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch
import torch.distributed as dist

from . import ops
from .distributed import local_tensor

__all__ = ["clip_grad_norm_", "grad_norm"]


def _with_grads(parameters) -> list[torch.Tensor]:
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    return [p for p in parameters if p.grad is not None]


def grad_norm(parameters: torch.Tensor | Iterable[torch.Tensor], *, process_group=None,
              backend: str | None = None) -> torch.Tensor:
    """Global L2 norm of the gradients of ``parameters`` (those without one are skipped), a 0-d fp32
    tensor on the first parameter's device, computed without a host sync.

    Parameters on several devices are summed per device (one fused norm each). With ``process_group``
    the squared norm is all-reduced over it first: the norm of gradients sharded over ranks (FSDP). A
    DTensor contributes its local shard.
    """
    params = _with_grads(parameters)
    device = params[0].device if params else torch.device("cpu")
    by_device: dict[torch.device, list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)
    for p in params:
        local, grad = local_tensor(p), local_tensor(p.grad)
        by_device[local.device].append((local, grad))
    total = torch.zeros((), dtype=torch.float32, device=local_tensor(params[0]).device if params else device)
    for pairs in by_device.values():
        norm, _ = ops.grad_norm([w for w, _ in pairs], [g for _, g in pairs], backend=backend)
        total = total + norm.to(total.device).square()
    if process_group is not None:
        dist.all_reduce(total, group=process_group)
    return total.sqrt()


def clip_grad_norm_(parameters: torch.Tensor | Iterable[torch.Tensor], max_norm: float, *,
                    process_group=None, backend: str | None = None) -> torch.Tensor:
    """Scale the gradients in place so that their global L2 norm is at most ``max_norm``; returns the
    norm before clipping (a 0-d fp32 device tensor).

    The rule is ``torch.nn.utils.clip_grad_norm_``'s: every gradient times
    ``min(1, max_norm / (norm + 1e-6))``, applied on the device (no host sync, so no
    ``error_if_nonfinite``: a non-finite norm makes the gradients non-finite, and GradScaler or SAM's
    non-finite check then skips the step). ``process_group``: see ``grad_norm``.
    """
    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or not max_norm > 0:
        raise ValueError(f"max_norm: must be a positive number, got {max_norm!r}")
    params = _with_grads(parameters)
    total = grad_norm(params, process_group=process_group, backend=backend)
    if not params:
        return total
    coef = torch.clamp(float(max_norm) / (total + 1e-6), max=1.0)
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = defaultdict(list)
    for p in params:
        grad = local_tensor(p.grad)
        groups[(grad.device, grad.dtype)].append(grad)
    for (grad_device, _), grads in groups.items():
        torch._foreach_mul_(grads, coef.to(grad_device))
    return total
