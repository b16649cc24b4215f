"""Pure-torch reference of every op: the ground truth that all other backends are tested against.

Written for reading, not for speed: one tensor at a time, no fusion; fp32 math (fp64 for float64
tensors, see "fp64" in ``common.py``), each tensor taken as a flat array in memory order (see "layout"
there). It runs on any device and makes no host sync. The op layer (``sam_kernels.ops``) has already
validated the inputs and dropped tensors without a gradient, and the entry point (``entry.py``) has
advanced Adam's step counters.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy
import torch

from .common import (
    NOISE_CONSTANTS,
    NOISE_STREAM_TAG,
    U32,
    AdamConfig,
    NoiseConfig,
    PerturbConfig,
    SgdConfig,
    compute_dtype,
    memory_order,
    split_u64,
)

# Philox4x32-10 constants (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11).
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10


def _mulhilo32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of a * b for uint32 values held in int64 tensors (no overflow)."""
    b_lo, b_hi = b & 0xFFFF, b >> 16
    low_part = b_lo * a  # < 2**48
    mid = b_hi * a + (low_part >> 16)  # < 2**49
    return mid >> 16, ((mid & 0xFFFF) << 16) | (low_part & 0xFFFF)


def philox4x32_10(counter: Sequence[torch.Tensor], key: tuple[int, int]) -> list[torch.Tensor]:
    """Philox4x32-10 on int64 tensors holding uint32 words; returns the four output words."""
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) & U32 for c in counter)
    c0, c1, c2, c3 = torch.broadcast_tensors(c0, c1, c2, c3)
    k0, k1 = key
    for _ in range(PHILOX_ROUNDS):
        hi0, lo0 = _mulhilo32(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo32(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + PHILOX_W0) & U32, (k1 + PHILOX_W1) & U32
    return [c0, c1, c2, c3]


def keep_mask(numel: int, tensor_index: int, seed: int, step: int | torch.Tensor, keep_threshold: int,
              device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean keep-mask of one flattened tensor, per the contract in ``backends/common.py``.

    ``step`` may be a 0-d int64 device tensor: its words are split on the device (no host read).
    """
    element = torch.arange(numel, dtype=torch.int64, device=device)
    if isinstance(step, torch.Tensor):
        step_lo, step_hi = step & U32, (step >> 32) & U32
    else:
        step_lo, step_hi = split_u64(step)
    word0 = philox4x32_10((element, tensor_index, step_lo, step_hi), split_u64(seed))[0]
    return (word0 >> 8) < keep_threshold


def sqrt_rn(values: torch.Tensor) -> torch.Tensor:
    """The correctly rounded square root (IEEE 754), which the noise contract needs.

    NOTE (sqrt): torch's vectorized CPU sqrt is not always correctly rounded (torch 2.14's differs from
    the IEEE result in about 17% of float32 and 1% of float64 results; a 0-d tensor takes another path),
    so on the CPU the root is NumPy's, the hardware instruction (no copy: the arrays share memory). CUDA's
    sqrt is IEEE without fast-math, which torch does not use.
    """
    if values.device.type != "cpu":
        return values.sqrt()
    return torch.from_numpy(numpy.sqrt(values.detach().contiguous().numpy()))


def _f32(values: torch.Tensor, name: str) -> torch.Tensor:
    """``values`` times the noise contract's constant ``name``, in float32 (one rounding)."""
    return values * torch.tensor(NOISE_CONSTANTS[name], dtype=torch.float32, device=values.device)


def box_muller(r0: torch.Tensor, r1: torch.Tensor) -> torch.Tensor:
    """The standard normal of the noise contract (``backends/common.py``) from two Philox words (int64
    tensors holding uint32 values), as float32, step by step in the contract's order."""
    c = NOISE_CONSTANTS
    # ln u1, u1 = n * 2**-24: the exponent and mantissa of float(n) (exact) from its bits.
    n = ((r0 >> 8) + 1).to(torch.float32)
    bits = n.view(torch.int32)
    e = (bits >> 23) - 127
    m = ((bits & 0x7FFFFF) | 0x3F800000).view(torch.float32)
    high = m > c["SQRT2"]
    m = torch.where(high, m * 0.5, m)
    e = e + high.to(e.dtype)
    s = (m - 1.0) / (m + 1.0)
    s2 = s * s
    t = s + s
    poly = _f32(s2, "LOG_C9") + c["LOG_C7"]
    poly = poly * s2 + c["LOG_C5"]
    poly = poly * s2 + c["LOG_C3"]
    ln_u = _f32((e - 24).to(torch.float32), "LN2") + (t + t * (s2 * poly))
    radius = sqrt_rn(ln_u * -2.0)
    # cos(2 pi u2): the quadrant from the top two bits, the angle within it reduced to [0, pi/4] exactly.
    v = r1 >> 8
    quadrant = v >> 22
    w = v & 0x3FFFFF
    upper = w >= (1 << 21)
    k = torch.where(upper, (1 << 22) - w, w)
    x = _f32(k.to(torch.float32), "ANGLE_STEP")
    x2 = x * x
    cos = _f32(x2, "COS_C10") + c["COS_C8"]
    for name in ("COS_C6", "COS_C4", "COS_C2"):
        cos = cos * x2 + c[name]
    cos = cos * x2 + 1.0
    sin = _f32(x2, "SIN_C9") + c["SIN_C7"]
    for name in ("SIN_C5", "SIN_C3"):
        sin = sin * x2 + c[name]
    sin = x + x * (x2 * sin)
    value = torch.where((quadrant & 1).bool() != upper, sin, cos)
    value = torch.where(((quadrant + 1) >> 1 & 1).bool(), -value, value)
    return radius * value


def gaussian_noise(numel: int, tensor_index: int, seed: int, step: int | torch.Tensor,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """The float32 standard normals of one flattened tensor, per the noise contract in
    ``backends/common.py``. ``step`` may be a 0-d int64 device tensor (split on the device)."""
    element = torch.arange(numel, dtype=torch.int64, device=device)
    if isinstance(step, torch.Tensor):
        step_lo, step_hi = step & U32, (step >> 32) & U32
    else:
        step_lo, step_hi = split_u64(step)
    words = philox4x32_10((element, tensor_index, step_lo, step_hi | NOISE_STREAM_TAG), split_u64(seed))
    return box_muller(words[0], words[1])


def grad_norm(grads: Sequence[torch.Tensor], weights: Sequence[torch.Tensor] | None,
              adaptive_eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Global L2 norm of the grads (each scaled elementwise by |w| + eta when weights are given)."""
    device = grads[0].device if grads else torch.device("cpu")
    total = torch.zeros((), dtype=torch.float32, device=device)
    for i, grad in enumerate(grads):
        g = grad.float()
        if weights is not None:
            g = (weights[i].float().abs() + adaptive_eta) * g
        total = total + (g * g).sum()
    return total.sqrt(), (~torch.isfinite(total)).float()


def _flat(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor as the kernels see it: a flat array in memory order, in its compute dtype."""
    return memory_order(tensor).to(compute_dtype(tensor.dtype))


def _write(tensor: torch.Tensor, values: torch.Tensor) -> None:
    """Store flat ``values`` (memory order) into ``tensor``, rounded to its dtype."""
    memory_order(tensor).copy_(values)


def perturb_(params, grads, backups, tensor_indices, norm, step, config: PerturbConfig) -> None:
    """backup = w; w += scale * mask * (T_w^2 if adaptive) * g, unless the norm is not finite."""
    rho, adaptive, adaptive_eta = config.rho, config.adaptive, config.adaptive_eta
    scale = rho / (norm + config.eps) if config.normalize else torch.full_like(norm, rho)
    scale = scale * config.scale_factor  # fp32 for every dtype
    finite = torch.isfinite(norm)
    for param, grad, backup, index in zip(params, grads, backups, tensor_indices, strict=False):
        backup.copy_(param)
        w = _flat(param)
        e = scale.to(w.dtype) * _flat(grad)
        if adaptive:
            t = w.abs() + adaptive_eta
            e = e * t * t
        if config.masked:
            mask = keep_mask(param.numel(), index, config.seed, step, config.keep_threshold, param.device)
            e = torch.where(mask, e, torch.zeros_like(e))
        _write(param, torch.where(finite, w + e, w))


def gaussian_noise_(params, backups, scales, tensor_indices, step, config: NoiseConfig) -> None:
    """backup = w; w += sigma * z (``NoiseConfig``), z the contract's float32 normal widened to the
    compute dtype."""
    for param, backup, scale, index in zip(params, backups, scales, tensor_indices, strict=False):
        backup.copy_(param)
        w = _flat(param)
        z = gaussian_noise(param.numel(), index, config.seed, step, param.device).to(w.dtype)
        spread = config.factor * _flat(scale)
        _write(param, w + (z / sqrt_rn(spread) if config.precision else spread * z))


def restore_(params, backups) -> None:
    """w = backup, bit for bit."""
    for param, backup in zip(params, backups, strict=False):
        param.copy_(backup)


def _effective_grad(grad, multiplier, maximize):
    g = _flat(grad)
    if multiplier is not None:
        g = g * multiplier
    return -g if maximize else g


def _skip_flag(found_inf, device):
    if found_inf is None:
        return torch.zeros((), dtype=torch.bool, device=device)
    return found_inf != 0


def restore_sgd_step_(params, backups, grads, momentum_buffers, first_step, config: SgdConfig,
                      grad_multiplier, found_inf) -> None:
    """w = backup, then one torch.optim.SGD step with the second gradient (skipped on found_inf)."""
    lr, momentum, dampening = config.lr, config.momentum, config.dampening
    weight_decay, nesterov, maximize = config.weight_decay, config.nesterov, config.maximize
    for i, (param, backup, grad) in enumerate(zip(params, backups, grads, strict=False)):
        skip = _skip_flag(found_inf, param.device)
        w = _flat(backup)
        g = _effective_grad(grad, grad_multiplier, maximize)
        if weight_decay != 0:
            g = g + weight_decay * w
        if momentum != 0:
            buf = _flat(momentum_buffers[i])
            new_buf = g if first_step[i] else momentum * buf + (1 - dampening) * g
            g = g + momentum * new_buf if nesterov else new_buf
            _write(momentum_buffers[i], torch.where(skip, buf, new_buf))
        _write(param, torch.where(skip, w, w - lr * g))


def restore_adam_step_(params, backups, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
                       config: AdamConfig, grad_multiplier, found_inf) -> None:
    """w = backup, then one torch.optim.Adam (or AdamW if decoupled) step; steps already advanced."""
    lr, beta1, beta2, eps = config.lr, config.beta1, config.beta2, config.eps
    weight_decay, decoupled, amsgrad, maximize = (config.weight_decay, config.decoupled, config.amsgrad,
                                                  config.maximize)
    for i, (param, backup, grad) in enumerate(zip(params, backups, grads, strict=False)):
        skip = _skip_flag(found_inf, param.device)
        w = _flat(backup)
        g = _effective_grad(grad, grad_multiplier, maximize)
        if weight_decay != 0:
            if decoupled:
                w_decayed = w * (1 - lr * weight_decay)
            else:
                g = g + weight_decay * w
                w_decayed = w
        else:
            w_decayed = w
        m_old, v_old = _flat(exp_avgs[i]), _flat(exp_avg_sqs[i])
        m = beta1 * m_old + (1 - beta1) * g
        v = beta2 * v_old + (1 - beta2) * g * g
        step = steps[i].to(w.dtype)
        bias_correction1 = 1 - torch.pow(beta1, step)
        bias_correction2_sqrt = (1 - torch.pow(beta2, step)).sqrt()
        if amsgrad:
            v_max_old = _flat(max_exp_avg_sqs[i])
            v_max = torch.maximum(v_max_old, v)
            _write(max_exp_avg_sqs[i], torch.where(skip, v_max_old, v_max))
            denom = v_max.sqrt() / bias_correction2_sqrt + eps
        else:
            denom = v.sqrt() / bias_correction2_sqrt + eps
        new_w = w_decayed - (lr / bias_correction1) * m / denom
        _write(exp_avgs[i], torch.where(skip, m_old, m))
        _write(exp_avg_sqs[i], torch.where(skip, v_old, v))
        _write(param, torch.where(skip, w, new_w))
