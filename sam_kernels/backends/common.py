"""Definitions every backend shares: the random-mask contract, the op configs, the backend interface and
tensor grouping.

NOTE (mask contract, identical in every backend): the Bernoulli(keep_prob) mask of the perturbation is
never stored. For element ``i`` of the tensor at global position ``t`` (its position in the optimizer's
parameter order, so grouping by dtype and chunking never change a mask) at RNG step ``s`` it is
regenerated as

    r = Philox4x32-10(key = (seed & 0xffffffff, seed >> 32),
                      counter = (i, t, s & 0xffffffff, s >> 32))[0]      # first output word
    keep(i) = (r >> 8) < round(keep_prob * 2**24)

An integer comparison on the top 24 bits leaves no floating-point rounding that a backend could do
differently, so the same seed and step give the same mask bit for bit everywhere.

NOTE (noise contract, identical in every backend): the standard normal ``z`` that the Gaussian noise op
(``gaussian_noise_``; bSAM's weight noise) adds for element ``i`` of the tensor at global position ``t`` at
RNG step ``s`` comes from the same generator and key as the mask, on a stream of its own:

    r0, r1 = Philox4x32-10(key = (seed & 0xffffffff, seed >> 32),
                           counter = (i, t, s & 0xffffffff, (s >> 32) | 0x80000000))[0:2]

The tag ``0x80000000`` in counter word 3 separates the streams: the mask's steps are below 2**63 (the op
layer refuses others), so its word 3 never has the top bit set, and no noise draw reuses a mask's random
numbers (or the other way round) for any seed, step, tensor or element. ``z`` is one Box-Muller draw,
``z = sqrt(-2 ln u1) cos(2 pi u2)``, from the top 24 bits of the two words, computed in float32 with
integer operations, bit casts and IEEE ``+ - * /`` and ``sqrt`` only, each rounded once (no FMA, no
library log, sin or cos), in the one order below, so every backend produces the same bits:

    n  = (r0 >> 8) + 1                   u1 = n * 2**-24, in (0, 1]: ln u1 finite
    e, m: float(n) (exact) = m * 2**e with m in [1, 2) from its exponent and mantissa bits;
          m > SQRT2: m = m * 0.5, e = e + 1               m in [0.707, 1.414]
    s = (m - 1) / (m + 1);  s2 = s * s;  t = s + s       ln m = 2 atanh(s)
    P = ((LOG_C9 * s2 + LOG_C7) * s2 + LOG_C5) * s2 + LOG_C3
    ln_u = float(e - 24) * LN2 + (t + t * (s2 * P))
    radius = sqrt(ln_u * -2)
    v = r1 >> 8;  q = v >> 22 (the quadrant, exact);  w = v & 0x3fffff
    upper = w >= 2**21;  k = upper ? 2**22 - w : w;  x = float(k) * ANGLE_STEP   x in [0, pi/4]
    x2 = x * x
    C = ((((COS_C10 * x2 + COS_C8) * x2 + COS_C6) * x2 + COS_C4) * x2 + COS_C2) * x2 + 1
    S = x + x * (x2 * (((SIN_C9 * x2 + SIN_C7) * x2 + SIN_C5) * x2 + SIN_C3))
    c = (q odd) != upper ? S : C;  c = q in (1, 2) ? -c : c                 cos(2 pi u2)
    z = radius * c

The constants are the float32 values of ``NOISE_CONSTANTS`` (Taylor coefficients of atanh, cos and sin,
sqrt(2), ln 2, pi / 2**23). The polynomials are accurate to about 1e-7 relative on their ranges; ``|z|``
is at most sqrt(48 ln 2) = 5.77 (the uniforms' 24-bit resolution). float64 parameters get the same float32
``z``, widened exactly.
"""

from __future__ import annotations

import functools
import itertools
import struct
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Protocol

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# NOTE (fp64): float64 tensors run with float64 element math in every backend (the perturbation, the
# restore and the SGD and Adam updates, Adam's bias corrections from its float32 step counters); the
# other dtypes compute in float32. Two scalars stay float32 for every dtype: the global norm (each
# element converted to float32 before its square, summed in float32; it only scales the perturbation)
# and therefore the perturbation scale rho / (norm + eps) * scale_factor, which the element math then
# widens. One consequence: finite fp64 gradients whose squares overflow fp32 (|g| above about 1.8e19)
# give an infinite norm, which flags the step as non-finite (skipped, as for an inf gradient).
#: How the dtypes above are named in error messages.
SUPPORTED_DTYPE_NAMES = "float32, float16, bfloat16 or float64"

#: Number of random bits compared against the keep threshold.
MASK_BITS = 24

U32 = 0xFFFFFFFF


#: Tag of the noise stream in Philox counter word 3 (see "noise contract").
NOISE_STREAM_TAG = 0x80000000

#: The float32 constants of the noise contract, as their bit patterns (so no language rounds a decimal).
NOISE_CONSTANT_BITS = {
    "SQRT2": 0x3FB504F3, "LN2": 0x3F317218, "ANGLE_STEP": 0x34C90FDB,
    "LOG_C3": 0x3EAAAAAB, "LOG_C5": 0x3E4CCCCD, "LOG_C7": 0x3E124925, "LOG_C9": 0x3DE38E39,
    "COS_C2": 0xBF000000, "COS_C4": 0x3D2AAAAB, "COS_C6": 0xBAB60B61, "COS_C8": 0x37D00D01,
    "COS_C10": 0xB493F27E,
    "SIN_C3": 0xBE2AAAAB, "SIN_C5": 0x3C088889, "SIN_C7": 0xB9500D01, "SIN_C9": 0x3638EF1D,
}
#: The same constants as Python floats (each exactly its float32 value).
NOISE_CONSTANTS = {name: struct.unpack("<f", struct.pack("<I", bits))[0]
                   for name, bits in NOISE_CONSTANT_BITS.items()}


def mask_threshold(keep_prob: float) -> int:
    """Integer threshold of the keep test ``(r >> 8) < threshold``; 2**24 keeps every element."""
    return round(keep_prob * (1 << MASK_BITS))


def split_u64(value: int) -> tuple[int, int]:
    """(low, high) 32-bit words of a non-negative integer below 2**64."""
    return value & U32, (value >> 32) & U32


# ------------------------------------------------------------------------------------ op configs
# NOTE (configs): the per-call options of each op, validated by whoever builds them (the op layer, or the
# optimizer's step plan) and read by every backend; they mirror the C++ PerturbConfig, SgdConfig and
# AdamConfig of csrc/include/sam_kernels/elementwise.h.


@dataclass(frozen=True)
class PerturbConfig:
    """``w += rho / (norm + eps) * scale_factor * m * (T_w^2 if adaptive) * g`` (``rho * scale_factor``
    without ``normalize``); ``m`` is the mask of the contract above at probability ``keep_prob``.

    NOTE (scale factor): the mask probability and the extra factor are separate: an unbiased
    elementwise mask passes ``scale_factor = 1 / keep_prob``; ESAM's per-tensor drop passes
    ``keep_prob = 1`` (no elementwise mask) and ``scale_factor = 1 / beta``."""

    rho: float
    eps: float = 1e-12
    keep_prob: float = 1.0
    scale_factor: float = 1.0
    normalize: bool = True
    adaptive: bool = False
    adaptive_eta: float = 0.0
    seed: int = 0
    #: Integer threshold of the keep test, derived from ``keep_prob`` (2**24: no mask).
    keep_threshold: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "keep_threshold", mask_threshold(self.keep_prob))

    @property
    def masked(self) -> bool:
        return self.keep_threshold < (1 << MASK_BITS)


@dataclass(frozen=True)
class NoiseConfig:
    """``w += sigma * z`` with ``z`` the standard normal of the noise contract above and a per-element
    ``sigma`` from a companion tensor ``scale``: ``sigma = factor * scale``, or with ``precision``
    ``1 / sqrt(factor * scale)`` (computed as ``z / sqrt(factor * scale)``; bSAM's ``sigma^2 = 1 / (N s)``
    from its precision ``s`` with ``factor = N``). C++: ``NoiseConfigT`` in elementwise.h, built from
    ``values()`` (the seed travels apart, as two 32-bit words)."""

    factor: float = 1.0
    precision: bool = False
    seed: int = 0

    def values(self) -> list[float]:
        """factor, precision: the values the compiled ops take (``noise_config`` in elementwise.h)."""
        return [float(self.factor), float(self.precision)]


def config_values(config) -> list[float]:
    """A step config's fields as floats, in order. NOTE: through ``dataclasses.fields``, not the instance's
    ``__dict__``: torch 2.11's dynamo cannot trace a frozen dataclass's ``__dict__`` (a graph break in
    a compiled step; torch 2.14's can)."""
    return [float(getattr(config, item.name)) for item in fields(config)]


@dataclass(frozen=True)
class SgdConfig:
    """One ``torch.optim.SGD`` step; the fields are SGD's param-group options, in the order of the values
    the kernels take (``values``; C++: ``sgd_config`` in elementwise.h)."""

    lr: float
    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    maximize: bool = False

    @classmethod
    def of_group(cls, group: dict) -> SgdConfig:
        """The step of a ``torch.optim.SGD`` param group (its options under the fields' names)."""
        return cls(float(group["lr"]), float(group["momentum"]), float(group["dampening"]),
                   float(group["weight_decay"]), bool(group["nesterov"]), bool(group["maximize"]))

    def check(self) -> None:
        """The values ``torch.optim.SGD`` accepts (the op layer checks; a param group was checked by
        torch's constructor)."""
        if min(self.lr, self.momentum, self.dampening, self.weight_decay) < 0:
            raise ValueError("lr, momentum, dampening and weight_decay must be non-negative")
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError("nesterov: requires a momentum > 0 and zero dampening")

    def values(self) -> list[float]:
        """The fields as floats, in order (how the compiled ops take a config)."""
        return config_values(self)

    def kernel_scalars(self) -> tuple[float, ...]:
        """lr, momentum, 1 - dampening, weight_decay: the scalars of the fused SGD kernels."""
        return float(self.lr), float(self.momentum), 1.0 - float(self.dampening), float(self.weight_decay)

    def kernel_switches(self) -> dict[str, bool]:
        """The compile-time switches of the fused SGD kernels."""
        return {"HAS_MOMENTUM": self.momentum != 0, "HAS_WEIGHT_DECAY": self.weight_decay != 0,
                "NESTEROV": bool(self.nesterov), "MAXIMIZE": bool(self.maximize)}


@dataclass(frozen=True)
class AdamConfig:
    """One ``torch.optim.Adam`` step (``AdamW`` with ``decoupled``), in the order of the values the kernels
    take (``values``; C++: ``adam_config`` in elementwise.h)."""

    lr: float
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    decoupled: bool = False
    amsgrad: bool = False
    maximize: bool = False

    @classmethod
    def of_group(cls, group: dict) -> AdamConfig:
        """The step of a ``torch.optim.Adam``/``AdamW`` param group."""
        beta1, beta2 = group["betas"]
        return cls(float(group["lr"]), float(beta1), float(beta2), float(group["eps"]),
                   float(group["weight_decay"]), bool(group.get("decoupled_weight_decay", False)),
                   bool(group["amsgrad"]), bool(group["maximize"]))

    def check(self) -> None:
        """The values ``torch.optim.Adam`` accepts."""
        if not (0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0):
            raise ValueError(f"betas: each must be in [0, 1), got {(self.beta1, self.beta2)}")
        if min(self.lr, self.eps, self.weight_decay) < 0:
            raise ValueError("lr, eps and weight_decay must be non-negative")

    def values(self) -> list[float]:
        """The fields as floats, in order (how the compiled ops take a config)."""
        return config_values(self)

    def kernel_scalars(self) -> tuple[float, ...]:
        """lr, beta1, beta2, 1 - beta1, 1 - beta2, eps, weight_decay, 1 - lr * weight_decay: the scalars of
        the fused Adam kernels."""
        lr, beta1, beta2 = float(self.lr), float(self.beta1), float(self.beta2)
        decay = float(self.weight_decay)
        return lr, beta1, beta2, 1.0 - beta1, 1.0 - beta2, float(self.eps), decay, 1.0 - lr * decay

    def kernel_switches(self) -> dict[str, bool]:
        """The compile-time switches of the fused Adam kernels."""
        return {"HAS_WEIGHT_DECAY": self.weight_decay != 0, "DECOUPLED": bool(self.decoupled),
                "AMSGRAD": bool(self.amsgrad), "MAXIMIZE": bool(self.maximize)}


@functools.cache
def _converters(cls: type) -> tuple:
    """(name, float or bool) of each field of a config class, in order."""
    return tuple((item.name, bool if item.type == "bool" else float) for item in fields(cls))


def config_from_values(cls: type, values: Sequence[float]):
    """The config whose ``values()`` are ``values`` (the compiled ops' side of the same order)."""
    return cls(*(convert(value) for (_, convert), value in zip(_converters(cls), values, strict=True)))


@functools.cache
def number_options(cls: type) -> tuple[str, ...]:
    """The options of a param group that the config of ``cls`` reads as numbers."""
    if cls is AdamConfig:
        return ("lr", "betas", "eps", "weight_decay")
    return tuple(name for name, convert in _converters(cls) if convert is float)


class Backend(Protocol):
    """What every backend module implements. Inputs arrive validated: one device, supported dtypes,
    dense (see "layout" below), companions matching their parameter in shape, dtype and layout, no
    missing gradients; per-step scalars are 0-d tensors on the parameters' device."""

    def grad_norm(self, grads: Sequence[torch.Tensor], weights: Sequence[torch.Tensor] | None,
                  adaptive_eta: float) -> tuple[torch.Tensor, torch.Tensor]: ...

    def perturb_(self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                 backups: Sequence[torch.Tensor], tensor_indices: Sequence[int], norm: torch.Tensor,
                 step: torch.Tensor, config: PerturbConfig) -> None: ...

    def restore_(self, params: Sequence[torch.Tensor], backups: Sequence[torch.Tensor]) -> None: ...

    def gaussian_noise_(self, params: Sequence[torch.Tensor], backups: Sequence[torch.Tensor],
                        scales: Sequence[torch.Tensor], tensor_indices: Sequence[int], step: torch.Tensor,
                        config: NoiseConfig) -> None: ...

    def restore_sgd_step_(self, params: Sequence[torch.Tensor], backups: Sequence[torch.Tensor],
                          grads: Sequence[torch.Tensor], momentum_buffers: Sequence[torch.Tensor | None],
                          first_step: Sequence[int], config: SgdConfig,
                          grad_multiplier: torch.Tensor | None, found_inf: torch.Tensor | None) -> None: ...

    def restore_adam_step_(self, params: Sequence[torch.Tensor], backups: Sequence[torch.Tensor],
                           grads: Sequence[torch.Tensor], exp_avgs: Sequence[torch.Tensor],
                           exp_avg_sqs: Sequence[torch.Tensor],
                           max_exp_avg_sqs: Sequence[torch.Tensor] | None, steps: Sequence[torch.Tensor],
                           config: AdamConfig, grad_multiplier: torch.Tensor | None,
                           found_inf: torch.Tensor | None) -> None: ...


# ---------------------------------------------------------------------------------------------- layout
# NOTE (layout): the kernels walk a tensor's memory as one flat array of ``numel`` elements from its data
# pointer. That is valid for any dense, non-overlapping layout (contiguous, channels_last, a permuted
# tensor) as long as every companion of a parameter (gradient, backup, optimizer state) lays its elements
# out in the same order, which is what "the same strides on every dimension of size > 1" means. The mask
# contract's element index is the element's position in that memory order (for a contiguous tensor, its
# logical flat index).


def is_dense(tensor: torch.Tensor) -> bool:
    """Whether ``tensor``'s elements fill ``numel`` consecutive memory slots, each once (any order)."""
    dims = sorted((stride, size) for size, stride in zip(tensor.shape, tensor.stride()) if size != 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def same_layout(tensor: torch.Tensor, like: torch.Tensor) -> bool:
    """Whether two tensors of one shape put every element at the same memory position (strides agree on
    every dimension of size > 1; a size-1 dimension's stride is arbitrary; two contiguous tensors, empty
    ones included, always do)."""
    if tensor.is_contiguous() and like.is_contiguous():
        return True
    return all(a == b or size == 1 for size, a, b in zip(like.shape, tensor.stride(), like.stride()))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the element math of tensors of ``dtype`` runs in (see "fp64")."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def memory_order(tensor: torch.Tensor) -> torch.Tensor:
    """A 1-D view of a dense tensor in memory order: element i is the i-th element the kernels visit."""
    return tensor.as_strided((tensor.numel(),), (1,))


def group_by_dtype(tensors: Sequence[torch.Tensor]) -> list[list[int]]:
    """Positions of ``tensors`` grouped by dtype, groups in order of first appearance."""
    groups: dict[torch.dtype, list[int]] = defaultdict(list)
    for position, tensor in enumerate(tensors):
        groups[tensor.dtype].append(position)
    return list(groups.values())


def _byte_span(tensor: torch.Tensor) -> tuple[int, int] | None:
    """[first, last) byte addresses ``tensor`` can touch, or None when it has no memory to race on (no
    elements, or a tensor without storage such as torch.compile's fake tensors)."""
    if tensor.numel() == 0:
        return None
    try:
        start = tensor.data_ptr()
    except RuntimeError:
        return None
    if start == 0:
        return None
    extent = 1 + sum((size - 1) * abs(stride) for size, stride in zip(tensor.shape, tensor.stride()))
    return start, start + extent * tensor.element_size()


def first_overlap(tensors: Sequence[torch.Tensor]) -> tuple[int, int] | None:
    """Positions ``(i, j)``, ``i < j``, of two tensors whose memory overlaps (the same tensor twice
    included), or None. NOTE: compares address ranges per device, so two disjoint views of one storage
    pass and a view that interleaves another (strided) is conservatively reported. Under torch.compile
    the tensors have no addresses to compare and nothing is reported (the optimizers check theirs when
    the parameter set is built, outside any compiled region)."""
    if torch.compiler.is_compiling():
        return None
    spans = []
    for position, tensor in enumerate(tensors):
        span = _byte_span(tensor)
        if span is not None:
            spans.append((str(tensor.device), span[0], span[1], position))
    spans.sort()
    for (device_a, _, end_a, pos_a), (device_b, start_b, _, pos_b) in itertools.pairwise(spans):
        if device_a == device_b and start_b < end_a:
            return min(pos_a, pos_b), max(pos_a, pos_b)
    return None
