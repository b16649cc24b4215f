"""Plain eager SAM for the integration tests, written from docs/algorithms.md and torch's AMP rules:
one tensor at a time, float64 norms, backups by copy, torch.optim's own step for the descent. Independent
of sam_kernels.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn


def make_mlp(seed: int = 0) -> nn.Module:
    """A tiny MLP without BatchNorm (batch statistics would make micro-batches and shards differ)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3))


def make_data(count: int, size: int = 8, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 6, generator=generator), torch.randint(0, 3, (size,), generator=generator))
            for _ in range(count)]


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x).float(), y)


def global_norm(grads) -> float:
    return math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))


def all_finite(grads) -> bool:
    return all(bool(torch.isfinite(g).all()) for g in grads)


class EagerSAM:
    """SAM (``normalize=False``: USAM) over a torch.optim base; ``scale`` mimics a loss scaler: the loss
    is multiplied by it before backward and the gradients divided by it afterwards, a step with a
    non-finite gradient in either pass is skipped (weights restored, base state untouched)."""

    def __init__(self, model: nn.Module, base: torch.optim.Optimizer, *, rho: float, eps: float = 1e-12,
                 normalize: bool = True) -> None:
        self.model, self.base, self.rho, self.eps, self.normalize = model, base, rho, eps, normalize
        self.params = [p for p in model.parameters()]

    def _backward(self, batches, scale: float, autocast, corrupt) -> list[torch.Tensor]:
        for p in self.params:
            p.grad = None
        for x, y in batches:
            with autocast() if autocast is not None else contextlib.nullcontext():
                loss = loss_of(self.model, x, y) / len(batches)
            (loss * scale).backward()
        if corrupt is not None:
            corrupt(self.params)
        return [p.grad / scale for p in self.params]

    @torch.no_grad()
    def step(self, ascent_batches, descent_batches=None, *, scale: float = 1.0, autocast=None,
             corrupt_ascent=None, corrupt_descent=None, clip: float | None = None) -> bool:
        """One SAM step; the loss of each pass is the mean over its micro-batches. Returns whether the
        step was skipped."""
        descent_batches = ascent_batches if descent_batches is None else descent_batches
        with torch.enable_grad():
            grads = self._backward(ascent_batches, scale, autocast, corrupt_ascent)
        finite_ascent = all_finite(grads)
        norm = global_norm(grads)
        backups = [p.clone() for p in self.params]
        if finite_ascent:
            for p, g in zip(self.params, grads, strict=True):
                factor = self.rho / (norm + self.eps) if self.normalize else self.rho
                p.add_(factor * g)
        with torch.enable_grad():
            grads = self._backward(descent_batches, scale, autocast, corrupt_descent)
        finite_descent = all_finite(grads)
        for p, backup, g in zip(self.params, backups, grads, strict=True):
            p.copy_(backup)
            p.grad = g
        if clip is not None:
            total = global_norm(grads)
            coef = min(1.0, clip / (total + 1e-6))
            for p in self.params:
                p.grad.mul_(coef)
        skipped = not (finite_ascent and finite_descent)
        if not skipped:
            self.base.step()
        return skipped


@torch.no_grad()
def per_worker_sam_step(model: nn.Module, base: torch.optim.Optimizer, shards, *, rho: float,
                        eps: float = 1e-12) -> None:
    """Data-parallel SAM with a per-worker ascent, simulated in one process: worker r perturbs w with the
    gradient of its own shard, takes the gradient of its shard at its own w + e_r; the descent steps with
    the average of those gradients."""
    params = list(model.parameters())
    weights = [p.clone() for p in params]
    total = [torch.zeros_like(p) for p in params]
    for x, y in shards:
        for p, w in zip(params, weights, strict=True):
            p.copy_(w)
            p.grad = None
        with torch.enable_grad():
            loss_of(model, x, y).backward()
        grads = [p.grad.clone() for p in params]
        norm = global_norm(grads)
        for p, g in zip(params, grads, strict=True):
            p.add_(rho / (norm + eps) * g)
            p.grad = None
        with torch.enable_grad():
            loss_of(model, x, y).backward()
        for t, p in zip(total, params, strict=True):
            t.add_(p.grad)
    for p, w, t in zip(params, weights, total, strict=True):
        p.copy_(w)
        p.grad = t / len(shards)
    base.step()


class HostSyncCounter:
    """Context manager counting the ATen ops that read a tensor's value on the host (``item()``,
    ``bool()``, ``int()``, ``torch.equal``): on a GPU each one is a device-to-host sync."""

    SYNCING = ("aten::_local_scalar_dense", "aten::equal", "aten::is_nonzero")

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        syncs = self.syncs = []

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func._schema.name in HostSyncCounter.SYNCING:
                    syncs.append(func._schema.name)
                return func(*args, **(kwargs or {}))

        self.mode = Mode()

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


@torch.no_grad()
def per_worker_esam_step(model: nn.Module, base: torch.optim.Optimizer, shards, *, rho: float, beta: float,
                         gamma: float, dropped: list[int], eps: float = 1e-12) -> None:
    """Data-parallel ESAM (per-tensor SWP, SDS) with a per-worker ascent, simulated in one process:
    worker r perturbs the kept tensors with its shard's gradient, scale rho / (||g_kept|| + eps) / beta,
    keeps the round(gamma * n) samples of its shard with the largest loss increase, and takes their
    gradient at its w + e_r; the descent steps with the average over the workers."""
    params = list(model.parameters())
    kept = [i for i in range(len(params)) if i not in dropped]
    weights = [p.clone() for p in params]
    total = [torch.zeros_like(p) for p in params]
    for x, y in shards:
        for p, w in zip(params, weights, strict=True):
            p.copy_(w)
            p.grad = None
        with torch.enable_grad():
            before = F.cross_entropy(model(x), y, reduction="none")
            before.mean().backward()
        grads = {i: params[i].grad.clone() for i in kept}
        norm = global_norm(grads.values())
        for i in kept:
            params[i].add_(rho / (norm + eps) / beta * grads[i])
        for p in params:
            p.grad = None
        after = F.cross_entropy(model(x), y, reduction="none")
        count = max(1, min(len(y), math.floor(gamma * len(y) + 0.5)))
        chosen = torch.sort(torch.argsort(after - before.detach(), descending=True)[:count]).values
        with torch.enable_grad():
            F.cross_entropy(model(x[chosen]), y[chosen]).backward()
        for t, p in zip(total, params, strict=True):
            t.add_(p.grad)
    for p, w, t in zip(params, weights, total, strict=True):
        p.copy_(w)
        p.grad = t / len(shards)
    base.step()
