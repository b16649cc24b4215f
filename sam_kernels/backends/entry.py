"""The typed entry points into a backend: the one way in for the op layer (``sam_kernels.ops``, after its
argument checks) and for the optimizers' step plans (``optim/``, whose lists were checked when the plan
was built).

Each takes the backend (a backend module, or a step plan's ``triton_backend.PlanBackend`` over its own
launch tables) and the op's options as its typed config (``common.py``: ``PerturbConfig``, ``SgdConfig``,
``AdamConfig``, ``NoiseConfig``; the C++ structs of ``csrc/include/sam_kernels/elementwise.h`` mirror
them). What every caller of an op must do besides the kernels is done here, once: Adam's step counters
advance in ``restore_adam_step_``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .common import AdamConfig, NoiseConfig, PerturbConfig, SgdConfig

Tensors = Sequence[torch.Tensor]


def grad_norm(backend, grads: Tensors, weights: Tensors | None,
              adaptive_eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Global norm of ``grads`` (ASAM-weighted by ``weights``) and its non-finite flag, on the device."""
    return backend.grad_norm(grads, weights, adaptive_eta)


def perturb_(backend, params: Tensors, grads: Tensors, backups: Tensors, tensor_indices: Sequence[int],
             norm: torch.Tensor, step: torch.Tensor, config: PerturbConfig) -> None:
    """backup = w, then w += e (``PerturbConfig``)."""
    backend.perturb_(params, grads, backups, tensor_indices, norm, step, config)


def gaussian_noise_(backend, params: Tensors, backups: Tensors, scales: Tensors,
                    tensor_indices: Sequence[int], step: torch.Tensor, config: NoiseConfig) -> None:
    """backup = w, then w += sigma * z (``NoiseConfig``; z: the noise contract of ``common.py``)."""
    backend.gaussian_noise_(params, backups, scales, tensor_indices, step, config)


def restore_(backend, params: Tensors, backups: Tensors) -> None:
    """w = backup, bit for bit."""
    backend.restore_(params, backups)


def restore_sgd_step_(backend, params: Tensors, backups: Tensors, grads: Tensors,
                      momentum_buffers: Sequence[torch.Tensor | None], first_step: Sequence[int],
                      config: SgdConfig, grad_multiplier: torch.Tensor | None,
                      found_inf: torch.Tensor | None) -> None:
    """w = backup, then one SGD step (skipped on the device when ``found_inf`` is set)."""
    backend.restore_sgd_step_(params, backups, grads, momentum_buffers, first_step, config, grad_multiplier,
                              found_inf)


def restore_adam_step_(backend, params: Tensors, backups: Tensors, grads: Tensors, exp_avgs: Tensors,
                       exp_avg_sqs: Tensors, max_exp_avg_sqs: Tensors | None, steps: Tensors,
                       config: AdamConfig, grad_multiplier: torch.Tensor | None,
                       found_inf: torch.Tensor | None) -> None:
    """Adam's step counters advance (by 0 where ``found_inf`` is set), then w = backup and one Adam step
    (the kernels read the advanced counters)."""
    advance_adam_steps_(steps, found_inf)
    backend.restore_adam_step_(params, backups, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
                               config, grad_multiplier, found_inf)


def advance_adam_steps_(steps: Tensors, found_inf: torch.Tensor | None) -> None:
    """Add 1 to Adam's per-parameter step counters, 0 when ``found_inf`` is nonzero, on the device."""
    if found_inf is None:
        torch._foreach_add_(steps, 1.0)
    else:
        # NOTE: a tensor list, not a 0-d tensor operand: the CPU kernel of the scalar-tensor overload
        # reads the scalar on the host, which would break CUDA-graph capture and compiled steps.
        increment = (found_inf == 0).float()  # any nonzero flag skips (GradScaler's may exceed 1)
        torch._foreach_add_(steps, [increment] * len(steps))
