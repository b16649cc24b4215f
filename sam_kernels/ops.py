"""The op layer: the multi-tensor operations of SAM-family optimizers, validated and dispatched.

Every op takes lists of tensors (the optimizer's parameters and their companions), validates them with
errors that name the argument, drops parameters without a gradient, and hands the rest to one backend
(``sam_kernels.backends``), which launches a fixed number of kernels per dtype group, never one per
tensor. Per-step scalars (norm, found-inf, gradient multiplier, steps) stay device tensors: no op reads
them on the host.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

from . import backends
from .backends import entry
from .backends.common import (
    SUPPORTED_DTYPE_NAMES,
    SUPPORTED_DTYPES,
    AdamConfig,
    NoiseConfig,
    PerturbConfig,
    SgdConfig,
    first_overlap,
    is_dense,
    mask_threshold,
    same_layout,
)
from .backends.reference import gaussian_noise, keep_mask

__all__ = ["gaussian_noise", "gaussian_noise_", "grad_norm", "keep_mask", "mask_threshold", "perturb_",
           "restore_", "restore_adam_step_", "restore_sgd_step_"]

Tensors = Sequence[torch.Tensor]
OptionalTensors = Sequence[torch.Tensor | None]


# ----------------------------------------------------------------------------------------- validation


def _check_list(name: str, tensors, length: int) -> None:
    if len(tensors) != length:
        raise ValueError(f"{name}: expected {length} tensors (one per parameter), got {len(tensors)}")


def _check_tensor(where: str, tensor, device: torch.device) -> None:
    """A dense (any non-overlapping layout), real floating tensor of a supported dtype on ``device``."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{where}: expected a tensor, got {type(tensor).__name__}")
    if tensor.is_sparse or tensor.layout != torch.strided:
        raise ValueError(f"{where}: sparse tensors are not supported; use dense gradients "
                         "(e.g. nn.Embedding(sparse=False))")
    if tensor.is_complex():
        raise ValueError(f"{where}: complex tensors are not supported; view them as real with "
                         "torch.view_as_real")
    if tensor.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{where}: dtype {tensor.dtype} is not supported; use {SUPPORTED_DTYPE_NAMES}")
    if tensor.device != device:
        raise ValueError(f"{where}: on {tensor.device} but the first parameter is on {device}; "
                         "all tensors of one call must share one device")
    if not tensor.is_contiguous() and not is_dense(tensor):
        raise ValueError(f"{where}: a strided view with gaps or overlaps is not supported (any dense "
                         f"layout is, channels_last included); {_layout_fix(where)}")


def _layout_fix(where: str) -> str:
    """How to give the tensor named ``where`` a usable layout: a gradient is not the parameters' doing."""
    if where.startswith("grads"):
        return ("the gradient is a strided view or has another layout than its parameter (a gradient "
                "hook, a custom autograd Function or code that assigns .grad returned one); return or "
                "assign a gradient laid out like its parameter (torch.empty_like(param).copy_(grad))")
    if where.startswith("params"):
        return "make the model's parameters dense (model.to(memory_format=torch.contiguous_format))"
    return "pass tensors laid out like their parameter (torch.empty_like(param).copy_(tensor))"


def _check_like(name: str, tensor: torch.Tensor, param: torch.Tensor, index: int) -> None:
    """``tensor`` is parameter ``index``'s companion (gradient, backup, state): same device, shape, dtype
    and memory layout."""
    where = f"{name}[{index}]"
    _check_tensor(where, tensor, param.device)
    if tensor.shape != param.shape:
        raise ValueError(f"{where}: shape {tuple(tensor.shape)} differs from parameter {index}'s "
                         f"{tuple(param.shape)}")
    if tensor.dtype != param.dtype:
        raise ValueError(f"{where}: dtype {tensor.dtype} differs from parameter {index}'s {param.dtype}")
    if not same_layout(tensor, param):
        raise ValueError(f"{where}: strides {tensor.stride()} differ from parameter {index}'s "
                         f"{param.stride()} (the kernels pair elements by memory position); "
                         f"{_layout_fix(where)}")


def _check_params(params: Tensors) -> None:
    for index, param in enumerate(params):
        _check_tensor(f"params[{index}]", param, params[0].device)
    pair = first_overlap(params)
    if pair is not None:
        raise ValueError(f"params[{pair[1]}]: shares memory with params[{pair[0]}] (the kernels would "
                         "race on it); pass each parameter once")


def _check_scalar(name: str, value: torch.Tensor | None, device: torch.device) -> None:
    if value is None:
        return
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        raise ValueError(f"{name}: expected a one-element tensor on the parameters' device")
    if value.device != device:
        raise ValueError(f"{name}: on {value.device}, expected {device} (the parameters' device)")


def _check_probability(name: str, value: float) -> None:
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name}: must be in (0, 1], got {value}")


def _with_grads(params: Tensors, grads: OptionalTensors | None) -> list[int]:
    """Positions of the parameters that have a gradient; validates those gradients."""
    _check_params(params)
    grads = [p.grad for p in params] if grads is None else grads
    _check_list("grads", grads, len(params))
    kept = [i for i, g in enumerate(grads) if g is not None]
    for i in kept:
        _check_like("grads", grads[i], params[i], i)
    return kept


def _resolve_grads(params: Tensors, grads: OptionalTensors | None) -> OptionalTensors:
    return [p.grad for p in params] if grads is None else grads


def _backend(params: Tensors, backend: str | None):
    device = params[0].device if len(params) else torch.device("cpu")
    name, _ = backends.resolve(device, backend)
    return backends.get(name)


def _pick(items, positions):
    return [items[i] for i in positions]


# ----------------------------------------------------------------------------------------------- ops


def grad_norm(params: Tensors, grads: OptionalTensors | None = None, *, adaptive: bool = False,
              adaptive_eta: float = 0.0, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Global L2 norm of the gradients of ``params`` and a non-finite flag, both 0-d fp32 device tensors.

    ``grads`` defaults to each parameter's ``.grad``; parameters without one are skipped. With
    ``adaptive`` each gradient is weighted elementwise by ``|w| + adaptive_eta`` (ASAM). The sum runs in
    fp32 in a fixed order (deterministic), float64 gradients included (see ``backends/common.py``,
    "fp64"). The flag is 1.0 when the norm is not finite (a NaN or inf in
    the gradients, or squares overflowing fp32), else 0.0: the ``found_inf`` convention of torch.amp.
    """
    kept = _with_grads(params, grads)
    grads = _resolve_grads(params, grads)
    weights = _pick(params, kept) if adaptive else None
    if not kept:
        device = params[0].device if len(params) else torch.device("cpu")
        zero = torch.zeros((), dtype=torch.float32, device=device)
        return zero, zero.clone()
    return entry.grad_norm(_backend(params, backend), _pick(grads, kept), weights, adaptive_eta)


def perturb_(params: Tensors, backups: Tensors, norm: torch.Tensor, *, rho: float,
             grads: OptionalTensors | None = None, eps: float = 1e-12, keep_prob: float = 1.0,
             scale_factor: float | None = None, normalize: bool = True, adaptive: bool = False,
             adaptive_eta: float = 0.0, seed: int = 0, step: int | torch.Tensor = 0,
             tensor_indices: Sequence[int] | None = None, backend: str | None = None) -> None:
    """Write ``backup = w``, then ``w += scale * m * (T_w^2 if adaptive) * g`` in place.

    ``scale = rho / (norm + eps) * scale_factor`` (``rho * scale_factor`` when ``normalize`` is False:
    the unnormalized ascent of USAM), computed on the device from the ``norm`` tensor;
    ``scale_factor`` defaults to ``1 / keep_prob`` (an unbiased mask); a negative one moves against
    ``g`` (Momentum SAM's ``w - rho * v / ||v||``). ``m`` is a Bernoulli(``keep_prob``)
    mask regenerated from (seed, step, tensor index, element index), see ``backends/common.py``;
    ``keep_prob=1`` means no mask. ``tensor_indices`` are the parameters' positions in the optimizer's
    global order (default: their positions in ``params``). A non-finite ``norm`` leaves every weight
    untouched (the backup is still written). Parameters without a gradient are neither perturbed nor
    backed up.
    """
    kept = _with_grads(params, grads)
    grads = _resolve_grads(params, grads)
    _check_list("backups", backups, len(params))
    _check_probability("keep_prob", keep_prob)
    scale_factor = 1.0 / keep_prob if scale_factor is None else scale_factor
    if not math.isfinite(scale_factor):
        raise ValueError(f"scale_factor: must be a finite number, got {scale_factor}")
    if rho < 0:
        raise ValueError(f"rho: must be non-negative, got {rho}")
    if eps < 0:
        raise ValueError(f"eps: must be non-negative, got {eps}")
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed: must be in [0, 2**64), got {seed}")
    tensor_indices = list(range(len(params))) if tensor_indices is None else list(tensor_indices)
    _check_list("tensor_indices", tensor_indices, len(params))
    if any(not 0 <= t < 2**32 for t in tensor_indices):
        raise ValueError("tensor_indices: every index must be in [0, 2**32)")
    for i in kept:
        _check_like("backups", backups[i], params[i], i)
    if not kept:
        return
    device = params[0].device
    _check_scalar("norm", norm, device)
    step = _device_step(step, device)
    config = PerturbConfig(rho=float(rho), eps=float(eps), keep_prob=float(keep_prob),
                           scale_factor=float(scale_factor), normalize=bool(normalize),
                           adaptive=bool(adaptive), adaptive_eta=float(adaptive_eta), seed=int(seed))
    entry.perturb_(_backend(params, backend), _pick(params, kept), _pick(grads, kept), _pick(backups, kept),
                   [int(t) for t in _pick(tensor_indices, kept)], norm.reshape(()).float(), step, config)


def gaussian_noise_(params: Tensors, backups: Tensors, scales: Tensors, *, factor: float = 1.0,
                    precision: bool = False, seed: int = 0, step: int | torch.Tensor = 0,
                    tensor_indices: Sequence[int] | None = None, backend: str | None = None) -> None:
    """Write ``backup = w``, then ``w += sigma * z`` in place, one launch over every tensor.

    ``z`` is a standard normal regenerated from (seed, step, tensor index, element index) by the noise
    contract (``backends/common.py``): the mask's Philox generator on a stream of its own and a Box-Muller
    transform in IEEE float32 operations only, so every backend adds the same noise bit for bit.
    ``sigma = factor * scales[i]`` elementwise, or with ``precision`` ``1 / sqrt(factor * scales[i])``
    (bSAM's posterior noise from its precision ``s`` and the data size ``factor = N``). ``scales[i]`` is
    laid out like ``params[i]``. ``tensor_indices`` are the parameters' positions in the optimizer's
    global order (default: their positions in ``params``); ``restore_`` undoes the op exactly.
    """
    _check_params(params)
    _check_list("backups", backups, len(params))
    _check_list("scales", scales, len(params))
    if isinstance(factor, bool) or not isinstance(factor, numbers.Real) or not math.isfinite(factor):
        raise ValueError(f"factor: must be a finite number, got {factor!r}")
    if precision and factor <= 0:
        raise ValueError(f"factor: must be positive with precision=True (sigma = 1 / sqrt(factor * s)), "
                         f"got {factor!r}")
    if not isinstance(precision, bool):
        raise TypeError(f"precision: must be True or False, got {precision!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**64:
        raise ValueError(f"seed: must be an int in [0, 2**64), got {seed!r}")
    tensor_indices = list(range(len(params))) if tensor_indices is None else list(tensor_indices)
    _check_list("tensor_indices", tensor_indices, len(params))
    if any(not 0 <= t < 2**32 for t in tensor_indices):
        raise ValueError("tensor_indices: every index must be in [0, 2**32)")
    for i, param in enumerate(params):
        _check_like("backups", backups[i], param, i)
        _check_like("scales", scales[i], param, i)
    if not len(params):
        return
    step = _device_step(step, params[0].device)
    config = NoiseConfig(factor=float(factor), precision=precision, seed=int(seed))
    entry.gaussian_noise_(_backend(params, backend), list(params), list(backups), list(scales),
                          [int(t) for t in tensor_indices], step, config)


def _device_step(step: int | torch.Tensor, device: torch.device) -> torch.Tensor:
    """The RNG step as a 0-d int64 tensor on ``device``.

    NOTE (no host sync): a Python int becomes a fill on the device (the value travels as a kernel
    argument), not a copy from host memory, which would make the host wait on CUDA.
    """
    if isinstance(step, torch.Tensor):
        _check_scalar("step", step, device)
        if step.dtype != torch.int64:
            raise ValueError(f"step: expected an int64 tensor, got {step.dtype}")
        return step.reshape(())
    if not 0 <= step < 2**63:
        raise ValueError(f"step: must be in [0, 2**63), got {step}")
    return torch.full((), step, dtype=torch.int64, device=device)


def restore_(params: Tensors, backups: Tensors, *, backend: str | None = None) -> None:
    """``w = backup`` for every parameter, bit for bit."""
    _check_params(params)
    _check_list("backups", backups, len(params))
    for i, backup in enumerate(backups):
        _check_like("backups", backup, params[i], i)
    if len(params):
        entry.restore_(_backend(params, backend), list(params), list(backups))


def _split_restore(params, backups, grads, backend):
    """Restore the parameters without a gradient; return the positions of those with one."""
    kept = _with_grads(params, grads)
    _check_list("backups", backups, len(params))
    kept_set = set(kept)
    missing = [i for i in range(len(params)) if i not in kept_set]
    if missing:
        restore_(_pick(params, missing), _pick(backups, missing), backend=backend)
    for i in kept:
        _check_like("backups", backups[i], params[i], i)
    return kept


def _check_step_scalars(params, grad_multiplier, found_inf):
    if len(params):
        _check_scalar("grad_multiplier", grad_multiplier, params[0].device)
        _check_scalar("found_inf", found_inf, params[0].device)
    return (grad_multiplier.reshape(()) if grad_multiplier is not None else None,
            found_inf.reshape(()) if found_inf is not None else None)


def restore_sgd_step_(params: Tensors, backups: Tensors, momentum_buffers: OptionalTensors, *,
                      lr: float, grads: OptionalTensors | None = None, momentum: float = 0.0,
                      dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False,
                      maximize: bool = False, grad_multiplier: torch.Tensor | None = None,
                      found_inf: torch.Tensor | None = None,
                      backend: str | None = None) -> list[torch.Tensor | None]:
    """``w = backup``, then one ``torch.optim.SGD`` step with the current gradient, fused in one pass.

    Weight decay acts on the restored weights. ``grad_multiplier`` (a device scalar) multiplies every
    gradient first (SSAM's renormalization, an AMP unscale). A nonzero ``found_inf`` restores the weights
    and leaves the momentum buffers unchanged. A ``None`` momentum buffer is created (torch's first
    step: ``buf = g``); returns the buffer list to keep in the optimizer state. Parameters without a
    gradient are only restored. ``backups[i]`` may be ``params[i]`` itself (a parameter that was not
    perturbed): every element is read before it is written.
    """
    config = SgdConfig(lr=float(lr), momentum=float(momentum), dampening=float(dampening),
                       weight_decay=float(weight_decay), nesterov=bool(nesterov), maximize=bool(maximize))
    config.check()
    kept = _split_restore(params, backups, grads, backend)
    grads = _resolve_grads(params, grads)
    _check_list("momentum_buffers", momentum_buffers, len(params))
    buffers = list(momentum_buffers)
    first_step = [buffers[i] is None for i in range(len(params))]
    if momentum != 0:
        for i in kept:
            if buffers[i] is None:
                buffers[i] = torch.zeros_like(params[i])  # the parameter's layout
            _check_like("momentum_buffers", buffers[i], params[i], i)
    grad_multiplier, found_inf = _check_step_scalars(params, grad_multiplier, found_inf)
    if kept:
        entry.restore_sgd_step_(_backend(params, backend), _pick(params, kept), _pick(backups, kept),
                                _pick(grads, kept), _pick(buffers, kept), [int(first_step[i]) for i in kept],
                                config, grad_multiplier, found_inf)
    return buffers


def restore_adam_step_(params: Tensors, backups: Tensors, exp_avgs: Tensors, exp_avg_sqs: Tensors,
                       max_exp_avg_sqs: Tensors | None, steps: Tensors, *, lr: float,
                       grads: OptionalTensors | None = None, betas: tuple[float, float] = (0.9, 0.999),
                       eps: float = 1e-8, weight_decay: float = 0.0,
                       decoupled_weight_decay: bool = False, amsgrad: bool = False,
                       maximize: bool = False, grad_multiplier: torch.Tensor | None = None,
                       found_inf: torch.Tensor | None = None, backend: str | None = None) -> None:
    """``w = backup``, then one ``torch.optim.Adam`` step (``AdamW`` with ``decoupled_weight_decay``).

    ``steps`` are the per-parameter step counters (0-d float32 tensors on the parameters' device, as
    torch keeps them for fused Adam); they are advanced here, by 0 where ``found_inf`` is set, in which
    case the weights are restored and every state tensor is left unchanged.
    """
    beta1, beta2 = betas
    if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
        raise ValueError(f"betas: each must be in [0, 1), got {betas}")
    config = AdamConfig(lr=float(lr), beta1=float(beta1), beta2=float(beta2), eps=float(eps),
                        weight_decay=float(weight_decay), decoupled=bool(decoupled_weight_decay),
                        amsgrad=bool(amsgrad), maximize=bool(maximize))
    config.check()
    kept = _split_restore(params, backups, grads, backend)
    grads = _resolve_grads(params, grads)
    state_lists = {"exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs}
    if amsgrad:
        if max_exp_avg_sqs is None:
            raise ValueError("max_exp_avg_sqs: required when amsgrad=True")
        state_lists["max_exp_avg_sqs"] = max_exp_avg_sqs
    for name, tensors in state_lists.items():
        _check_list(name, tensors, len(params))
        for i in kept:
            _check_like(name, tensors[i], params[i], i)
    _check_list("steps", steps, len(params))
    for i in kept:
        step = steps[i]
        if step.dtype != torch.float32 or step.numel() != 1 or step.device != params[i].device:
            raise ValueError(f"steps[{i}]: expected a one-element float32 tensor on "
                             f"{params[i].device}, got {step.dtype} on {step.device}")
    grad_multiplier, found_inf = _check_step_scalars(params, grad_multiplier, found_inf)
    if not kept:
        return
    entry.restore_adam_step_(
        _backend(params, backend), _pick(params, kept), _pick(backups, kept), _pick(grads, kept),
        _pick(exp_avgs, kept), _pick(exp_avg_sqs, kept), _pick(max_exp_avg_sqs, kept) if amsgrad else None,
        _pick(steps, kept), config, grad_multiplier, found_inf)


#: Add 1 to Adam's per-parameter step counters (0 where ``found_inf`` is set); kept here for callers of
#: the op layer, the optimizers and ``restore_adam_step_`` advance them through ``backends.entry``.
advance_adam_steps_ = entry.advance_adam_steps_
