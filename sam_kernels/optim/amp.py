"""The optimizer side of torch.amp.GradScaler's protocol for SAM's two passes.

The scaler multiplies the loss by a scale S before each backward, so both passes produce gradients
S times too large. SAM unscales inside each pass on the device: the ascent folds 1/S into the norm that
scales the perturbation (no extra pass over the gradients), the descent into the fused step's gradient
multiplier. A non-finite gradient in either pass skips the step (the weights come back bit for bit) and
is recorded in the scaler's state, so ``scaler.update()`` backs off.

NOTE (private GradScaler state): the scaler has no public way to read its scale without a host sync
(``get_scale()`` calls ``item()``) or to receive an inf found outside its own check, and SAM's first
pass happens outside ``scaler.step``. These helpers read ``_get_scale_async()`` and write into
``_per_optimizer_states[id(optimizer)]["found_inf_per_device"]``, the tensors ``update()`` consumes;
python_tests/torch_features/test_amp.py fails if a torch release changes either.
"""

from __future__ import annotations

from typing import Any

import torch


def scaler_enabled(grad_scaler: Any) -> bool:
    """Whether ``grad_scaler`` is an enabled ``torch.amp.GradScaler`` (None and disabled ones: False)."""
    if grad_scaler is None:
        return False
    if not isinstance(grad_scaler, torch.amp.GradScaler):
        raise TypeError(f"grad_scaler: expected a torch.amp.GradScaler, got {type(grad_scaler).__name__}")
    return grad_scaler.is_enabled()


def current_scale(grad_scaler: torch.amp.GradScaler, device: torch.device) -> torch.Tensor:
    """The scaler's scale S as a 0-d fp32 tensor on ``device``, read without a host sync."""
    scale = grad_scaler._get_scale_async()
    if scale is None:
        raise RuntimeError("grad_scaler: has no scale yet; call scaler.scale(loss).backward() before "
                           "first_step(grad_scaler=scaler)")
    return scale.to(device=device, dtype=torch.float32, non_blocking=True)


def inverse(scale: torch.Tensor) -> torch.Tensor:
    """1/S rounded the way GradScaler's own unscale rounds it (reciprocal in fp64, then fp32)."""
    return scale.double().reciprocal().float()


def record_found_inf(grad_scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer,
                     found_inf: torch.Tensor) -> None:
    """Fold ``found_inf`` into the flags the scaler recorded for ``optimizer`` in this iteration (in place,
    on the device), so that ``update()`` backs off when either SAM pass overflowed."""
    recorded = grad_scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"]
    if not recorded:
        # NOTE: the scaler saw no gradient to check (a plain step whose gradients SAM had put aside);
        # record SAM's flag so that ``update()`` has the check it requires.
        recorded[found_inf.device] = found_inf.to(torch.float32).clone()
        return
    for flag in recorded.values():
        flag.copy_(torch.maximum(flag, found_inf.to(device=flag.device, dtype=flag.dtype)))
