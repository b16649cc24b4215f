"""Schedules that decide, step by step, whether a SAM step runs (the ascent and the second pass) or a
plain step of the base optimizer with the first gradient (one forward and backward).

Pass one as ``SAM(..., schedule=...)`` (ESAM too, host schedules only). The decision for step ``t``
(the optimizer's SAM-step counter, saved by ``state_dict``):

- ``Interval(k)``: SAM on every k-th step, ``t % k == 0`` (MosaicML Composer's interval SAM; scale rho
  up with k).
- ``Randomized(p)``: SAM with probability ``p`` (a number or a function of ``t``), drawn from the
  optimizer's seed and ``t`` (Zhao et al., randomized sharpness-aware training, arXiv 2203.09962).
- ``LatePhase(start)``: plain steps before ``start`` (a step, or a fraction of ``total_steps``), SAM
  from there on (arXiv 2410.10373).
- ``AESAM(total_steps)``: SAM when the squared gradient norm is high against its running statistics
  (Jiang et al., ICLR 2023, arXiv 2304.14647); see ``AESAM``.

NOTE (decision on the host): the first three are functions of the step and the seed, known before the
first forward, so ESAM's dropped tensors and ``step(closure)`` can act on them. AE-SAM's decision needs
the first gradient's norm: its statistics live on the device and the decision costs one device-to-host
read of a single flag per step, right after the first backward (documented in docs/algorithms.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from .checks import check_non_negative

__all__ = ["AESAM", "Interval", "LatePhase", "Randomized", "Schedule"]

_MASK64 = (1 << 64) - 1


def _mix64(value: int) -> int:
    """SplitMix64's finalizer: a well-mixed 64-bit word from any 64-bit word."""
    value = (value ^ (value >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
    value = (value ^ (value >> 27)) * 0x94D049BB133111EB & _MASK64
    return value ^ (value >> 31)


def uniform(seed: int, step: int) -> float:
    """A uniform number in [0, 1) that depends only on (seed, step): the same on every rank and after
    a resume, with no generator state to save."""
    word = _mix64((seed * 0x9E3779B97F4A7C15 + _mix64(step + 0x632BE59BD9B4E019)) & _MASK64)
    return (word >> 11) * 2.0**-53


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: must be an int >= {minimum}, got {value!r}")
    return value


def _check_finite(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}: must be a finite number, got {value!r}")
    return float(value)


class Schedule:
    """Base class: ``decide(step, seed)`` says whether step ``step`` is a SAM step."""

    #: Whether the decision needs the first gradient's squared norm (then ``decide`` gets it as a
    #: 0-d fp32 device tensor and may read it on the host).
    needs_grad_norm = False

    def decide(self, step: int, seed: int, squared_norm: torch.Tensor | None = None,
               finite: torch.Tensor | None = None) -> bool:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """What a resume needs besides the step and the seed (nothing for the host schedules)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"schedule: {type(self).__name__} keeps no state, got {sorted(state)}")


class Interval(Schedule):
    """SAM on every ``k``-th step (``step % k == 0``), plain steps in between."""

    def __init__(self, k: int) -> None:
        self.k = _check_int("k", k, 1)

    def decide(self, step, seed, squared_norm=None, finite=None) -> bool:
        return step % self.k == 0

    def __repr__(self) -> str:
        return f"Interval(k={self.k})"


class Randomized(Schedule):
    """SAM with probability ``p`` per step: a number in [0, 1] or a function ``p(step)`` (a schedule).

    The draw is ``uniform(seed, step) < p``: deterministic, identical on every rank that shares the
    seed, and the same after a resume."""

    def __init__(self, p: float | Callable[[int], float]) -> None:
        if not callable(p):
            self._check_probability(p)
        self.p = p

    @staticmethod
    def _check_probability(p: Any) -> float:
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
            raise ValueError(f"p: must be a probability in [0, 1] (or a function of the step "
                             f"returning one), got {p!r}")
        return float(p)

    def probability(self, step: int) -> float:
        return self._check_probability(self.p(step) if callable(self.p) else self.p)

    def decide(self, step, seed, squared_norm=None, finite=None) -> bool:
        return uniform(seed, step) < self.probability(step)

    def __repr__(self) -> str:
        return f"Randomized(p={self.p!r})"


class LatePhase(Schedule):
    """Plain steps before ``start``, SAM steps from ``start`` on. ``start`` is a step (an int) or a
    fraction of ``total_steps`` (a float in [0, 1])."""

    def __init__(self, start: int | float, total_steps: int | None = None) -> None:
        if isinstance(start, float):
            if not 0.0 <= start <= 1.0:
                raise ValueError(f"start: a fraction must be in [0, 1], got {start!r}")
            if total_steps is None:
                raise ValueError("total_steps: required when start is a fraction")
            start = math.ceil(start * _check_int("total_steps", total_steps, 1))
        self.start = _check_int("start", start, 0)

    def decide(self, step, seed, squared_norm=None, finite=None) -> bool:
        return step >= self.start

    def __repr__(self) -> str:
        return f"LatePhase(start={self.start})"


class AESAM(Schedule):
    """AE-SAM's adaptive policy: SAM only where the squared gradient norm ``s = ||g||^2`` is large.

    Running statistics on the device, updated every step with a finite gradient:
    ``mu = d * mu + (1 - d) * s`` then ``var = d * var + (1 - d) * (s - mu)^2`` (the new ``mu``), both
    starting at 0. The threshold ``c_t`` moves linearly from ``lambda_2`` at step 0 to ``lambda_1`` at
    ``total_steps`` (held there after). Step ``t`` is a SAM step iff ``s >= mu + c_t * sqrt(var)``
    with the statistics that include ``s``.
    """

    needs_grad_norm = True

    def __init__(self, total_steps: int, *, decay: float = 0.9, lambda_1: float = -1.0,
                 lambda_2: float = 1.0) -> None:
        self.total_steps = _check_int("total_steps", total_steps, 1)
        check_non_negative("decay", decay)
        if not decay < 1.0:
            raise ValueError(f"decay: must be in [0, 1), got {decay!r}")
        self.decay = float(decay)
        self.lambda_1 = _check_finite("lambda_1", lambda_1)
        self.lambda_2 = _check_finite("lambda_2", lambda_2)
        self.mean: torch.Tensor | None = None
        self.var: torch.Tensor | None = None

    def threshold(self, step: int) -> float:
        """``c_t``: ``lambda_2`` at step 0 to ``lambda_1`` at ``total_steps``, linearly."""
        progress = min(step / self.total_steps, 1.0)
        return self.lambda_2 + (self.lambda_1 - self.lambda_2) * progress

    def decide(self, step, seed, squared_norm=None, finite=None) -> bool:
        s = squared_norm.float()
        if self.mean is None:
            self.mean = torch.zeros((), dtype=torch.float32, device=s.device)
            self.var = torch.zeros((), dtype=torch.float32, device=s.device)
        elif self.mean.device != s.device:  # loaded from a checkpoint on another device
            self.mean, self.var = self.mean.to(s.device), self.var.to(s.device)
        d = self.decay
        ok = torch.isfinite(s) if finite is None else finite
        mean = torch.where(ok, d * self.mean + (1.0 - d) * s, self.mean)
        var = torch.where(ok, d * self.var + (1.0 - d) * (s - mean).square(), self.var)
        self.mean.copy_(mean)
        self.var.copy_(var)
        # NOTE (one read per step): the only host sync of AE-SAM, a single flag.
        return bool(s >= mean + self.threshold(step) * var.sqrt())

    def state_dict(self) -> dict[str, Any]:
        if self.mean is None:
            return {}
        return {"mean": self.mean.clone(), "var": self.var.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            self.mean = self.var = None
            return
        if set(state) != {"mean", "var"}:
            raise ValueError(f"schedule: AESAM state needs 'mean' and 'var', got {sorted(state)}")
        for key in ("mean", "var"):
            value = state[key]
            if not isinstance(value, torch.Tensor) or value.numel() != 1:
                raise ValueError(f"schedule: AESAM state {key!r} must be a one-element tensor")
        self.mean = state["mean"].detach().reshape(()).float().clone()
        self.var = state["var"].detach().reshape(()).float().clone()

    def __repr__(self) -> str:
        return (f"AESAM(total_steps={self.total_steps}, decay={self.decay}, lambda_1={self.lambda_1}, "
                f"lambda_2={self.lambda_2})")


def check_schedule(schedule: Any) -> Schedule | None:
    if schedule is not None and not isinstance(schedule, Schedule):
        raise TypeError("schedule: expected None or a sam_kernels.optim.schedules.Schedule (Interval, "
                        f"Randomized, LatePhase, AESAM), got {schedule!r}")
    return schedule

