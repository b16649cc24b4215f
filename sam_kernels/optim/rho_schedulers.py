"""Schedulers of SAM's radius, used like torch's LR schedulers: built over the optimizer, ``step()`` after
each optimizer step (after the LR scheduler's), ``state_dict()`` / ``load_state_dict()`` for checkpoints.

They write each param group's ``sam_rho``, the option every SAM-family optimizer reads at each ascent:

- ``LambdaRho(optimizer, rho_lambda)``: rho = initial rho * rho_lambda(t) (as ``LambdaLR``);
- ``MultiplicativeRho(optimizer, rho_lambda)``: rho *= rho_lambda(t) at each step (as
  ``MultiplicativeLR``); it multiplies the current value, so it chains after another scheduler;
- ``ProportionalRho(optimizer, rho_max, rho_min, lr_max, lr_min)``: GSAM's rule (Zhuang et al., ICLR 2022),
  rho linear in the group's current learning rate, rho_max at lr_max and rho_min at lr_min.

Each sets rho at construction too (step 0), so the first step already runs with the scheduled radius.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from .checks import check_non_negative

__all__ = ["LambdaRho", "MultiplicativeRho", "ProportionalRho", "RhoScheduler"]


class RhoScheduler:
    """The base: ``get_rho()`` (per param group, at step ``last_step``) is written into the groups at
    construction and by every ``step()``."""

    def __init__(self, optimizer: Any) -> None:
        groups = getattr(optimizer, "param_groups", None)
        if not groups or any("sam_rho" not in group for group in groups):
            raise TypeError(f"optimizer: {type(optimizer).__name__} has no SAM radius in its param groups; "
                            "schedule the rho of a sam_kernels SAM-family optimizer")
        self.optimizer = optimizer
        self.base_rhos = [float(group["sam_rho"]) for group in groups]
        self.last_step = 0
        self._apply()

    def get_rho(self) -> list[float]:
        """The radius of each param group at step ``last_step``."""
        raise NotImplementedError

    def step(self) -> None:
        """Advance one step and write the new radii (after ``optimizer.step()`` or ``second_step()``)."""
        self.last_step += 1
        self._apply()

    def get_last_rho(self) -> list[float]:
        """The radii the last ``step()`` (or the construction) wrote, per param group."""
        return list(self._last_rho)

    def _apply(self) -> None:
        rhos = [float(rho) for rho in self.get_rho()]
        for index, rho in enumerate(rhos):
            if not math.isfinite(rho) or rho < 0:
                raise ValueError(f"{type(self).__name__}: param group {index} would get rho {rho!r} at step "
                                 f"{self.last_step}; a radius must be finite and >= 0")
        for group, rho in zip(self.optimizer.param_groups, rhos, strict=True):
            group["sam_rho"] = rho
        self._last_rho = rhos

    def state_dict(self) -> dict[str, Any]:
        """The scheduler's state without the optimizer and without functions (as torch's schedulers:
        the lambdas are code, rebuilt by the script that resumes)."""
        return {key: value for key, value in self.__dict__.items()
                if key != "optimizer" and not callable(value) and key != "rho_lambdas"}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume from ``state_dict()``; the groups' radii come back with the optimizer's own state dict."""
        unknown = set(state_dict) - set(self.state_dict())
        if unknown:
            raise ValueError(f"state_dict: unknown entries {sorted(unknown)} for {type(self).__name__}")
        self.__dict__.update(state_dict)


def _lambdas(optimizer: Any, rho_lambda: Callable | Sequence[Callable]) -> list[Callable]:
    """One function per param group (one given function serves every group)."""
    count = len(getattr(optimizer, "param_groups", ()))
    lambdas = list(rho_lambda) if isinstance(rho_lambda, (list, tuple)) else [rho_lambda] * count
    if len(lambdas) != count or not all(callable(f) for f in lambdas):
        raise ValueError(f"rho_lambda: expected a function or {count} functions (one per param group)")
    return lambdas


class LambdaRho(RhoScheduler):
    """rho of each group = its initial rho * ``rho_lambda(step)`` (a function, or one per group)."""

    def __init__(self, optimizer: Any, rho_lambda: Callable | Sequence[Callable]) -> None:
        self.rho_lambdas = _lambdas(optimizer, rho_lambda)
        super().__init__(optimizer)

    def get_rho(self) -> list[float]:
        return [base * f(self.last_step) for base, f in zip(self.base_rhos, self.rho_lambdas, strict=True)]


class MultiplicativeRho(RhoScheduler):
    """rho of each group *= ``rho_lambda(step)`` at every ``step()`` (not at construction)."""

    def __init__(self, optimizer: Any, rho_lambda: Callable | Sequence[Callable]) -> None:
        self.rho_lambdas = _lambdas(optimizer, rho_lambda)
        super().__init__(optimizer)

    def get_rho(self) -> list[float]:
        current = [float(group["sam_rho"]) for group in self.optimizer.param_groups]
        if self.last_step == 0:
            return current
        return [rho * f(self.last_step) for rho, f in zip(current, self.rho_lambdas, strict=True)]


class ProportionalRho(RhoScheduler):
    """GSAM's radius: ``rho_min + (rho_max - rho_min) * (lr - lr_min) / (lr_max - lr_min)`` with each group's
    current ``lr`` (step it after the LR scheduler, which sets that lr)."""

    def __init__(self, optimizer: Any, rho_max: float, rho_min: float, lr_max: float, lr_min: float) -> None:
        for name, value in (("rho_max", rho_max), ("rho_min", rho_min), ("lr_max", lr_max),
                            ("lr_min", lr_min)):
            check_non_negative(name, value)
        if lr_max <= lr_min:
            raise ValueError(f"lr_max ({lr_max}) must be above lr_min ({lr_min}): rho is linear in the "
                             "learning rate between them")
        if rho_max < rho_min:
            raise ValueError(f"rho_max ({rho_max}) must be at least rho_min ({rho_min})")
        self.rho_max, self.rho_min = float(rho_max), float(rho_min)
        self.lr_max, self.lr_min = float(lr_max), float(lr_min)
        super().__init__(optimizer)

    def get_rho(self) -> list[float]:
        span = self.lr_max - self.lr_min
        return [self.rho_min + (self.rho_max - self.rho_min) * (float(group["lr"]) - self.lr_min) / span
                for group in self.optimizer.param_groups]
