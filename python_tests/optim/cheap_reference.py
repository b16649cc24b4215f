"""Plain eager implementations of the cheap SAM variants, written from their published definitions
(docs/algorithms.md), independent of the package: one Python loop over tensors, float64 scalars where
the definition has a scalar, a copy of the weights for every restore.

A run is driven by ``run(reference, model, batches)``: ``reference.step(model, x, y)`` computes its
own gradients (one or two forward/backward passes) and updates the model in place.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

EPS = 1e-12


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y)


def gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """The gradients of the batch loss at the model's current weights (the model's .grad is left None)."""
    params = list(model.parameters())
    for p in params:
        p.grad = None
    loss_of(model, x, y).backward()
    grads = [p.grad.detach().clone() for p in params]
    for p in params:
        p.grad = None
    return grads


def norm(tensors) -> float:
    return math.sqrt(sum(float((t.double() ** 2).sum()) for t in tensors))


def dot(a, b) -> float:
    return sum(float((x.double() * y.double()).sum()) for x, y in zip(a, b, strict=True))


def mix64(value: int) -> int:
    """SplitMix64's finalizer (the documented draw of the randomized schedule)."""
    mask = (1 << 64) - 1
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & mask
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & mask
    return value ^ (value >> 31)


def documented_uniform(seed: int, step: int) -> float:
    """u(seed, step) = top 53 bits of mix64(seed * 0x9E3779B97F4A7C15 + mix64(step + 0x632BE59BD9B4E019))."""
    mask = (1 << 64) - 1
    word = mix64((seed * 0x9E3779B97F4A7C15 + mix64((step + 0x632BE59BD9B4E019) & mask)) & mask)
    return (word >> 11) / 2.0**53


class ScheduledSAM:
    """SAM on the steps ``decide(t, ||g||^2)`` picks, a plain base step with g on the others."""

    def __init__(self, model: nn.Module, base: torch.optim.Optimizer, rho: float, decide) -> None:
        self.params = list(model.parameters())
        self.base, self.rho, self.decide = base, rho, decide
        self.t = 0
        self.sam_steps: list[bool] = []

    def step(self, model, x, y) -> None:
        g = gradients(model, x, y)
        sam = self.decide(self.t, norm(g) ** 2)
        self.sam_steps.append(sam)
        if sam:
            saved = [p.detach().clone() for p in self.params]
            scale = self.rho / (norm(g) + EPS)
            with torch.no_grad():
                for p, gi in zip(self.params, g, strict=True):
                    p.add_(gi * scale)
            g = gradients(model, x, y)
            with torch.no_grad():
                for p, w in zip(self.params, saved, strict=True):
                    p.copy_(w)
        for p, gi in zip(self.params, g, strict=True):
            p.grad = gi
        self.base.step()
        for p in self.params:
            p.grad = None
        self.t += 1


class AESAMRule:
    """AE-SAM's decision: EMA mean and variance of s = ||g||^2 (both from 0), the variance with the
    updated mean, threshold c_t linear from lambda_2 (t = 0) to lambda_1 (t = T)."""

    def __init__(self, total_steps: int, decay: float = 0.9, lambda_1: float = -1.0,
                 lambda_2: float = 1.0) -> None:
        self.T, self.d, self.l1, self.l2 = total_steps, decay, lambda_1, lambda_2
        self.mean = self.var = 0.0

    def __call__(self, t: int, s: float) -> bool:
        self.mean = self.d * self.mean + (1 - self.d) * s
        self.var = self.d * self.var + (1 - self.d) * (s - self.mean) ** 2
        c = self.l2 + (self.l1 - self.l2) * min(t / self.T, 1.0)
        return s >= self.mean + c * math.sqrt(self.var)


class EagerLookSAM:
    """LookSAM: every k-th step (from step 0) a SAM step keeping g_v = g_s - (<g, g_s> / ||g||^2) g;
    other steps use g + alpha * ||g|| / ||g_v|| * g_v; global norms and dot products."""

    def __init__(self, model: nn.Module, base: torch.optim.Optimizer, rho: float, k: int,
                 alpha: float) -> None:
        self.params = list(model.parameters())
        self.base, self.rho, self.k, self.alpha = base, rho, k, alpha
        self.t = 0
        self.gv: list[torch.Tensor] | None = None

    def step(self, model, x, y) -> None:
        g = gradients(model, x, y)
        if self.t % self.k == 0:
            saved = [p.detach().clone() for p in self.params]
            scale = self.rho / (norm(g) + EPS)
            with torch.no_grad():
                for p, gi in zip(self.params, g, strict=True):
                    p.add_(gi * scale)
            gs = gradients(model, x, y)
            with torch.no_grad():
                for p, w in zip(self.params, saved, strict=True):
                    p.copy_(w)
            c = dot(g, gs) / norm(g) ** 2
            self.gv = [s.double() - c * gi.double() for s, gi in zip(gs, g, strict=True)]
            update = gs
        else:
            coefficient = self.alpha * norm(g) / (norm(self.gv) + EPS)
            update = [(gi.double() + coefficient * v).to(gi.dtype) for gi, v in zip(g, self.gv, strict=True)]
        for p, u in zip(self.params, update, strict=True):
            p.grad = u
        self.base.step()
        for p in self.params:
            p.grad = None
        self.t += 1


class EagerMSAM:
    """Momentum SAM over torch.optim.SGD: the gradient at w~ = w - rho * v / (||v|| + eps), then the SGD
    step from w (weight decay at w, torch's convention), then w~ from the new v."""

    def __init__(self, model: nn.Module, lr: float, momentum: float, rho: float,
                 weight_decay: float = 0.0) -> None:
        self.params = list(model.parameters())
        self.w = [p.detach().clone() for p in self.params]
        self.base = torch.optim.SGD(self.params, lr=lr, momentum=momentum, weight_decay=weight_decay)
        self.rho = rho

    def step(self, model, x, y) -> None:
        g = gradients(model, x, y)  # at w~ (the model holds w~ between steps)
        with torch.no_grad():
            for p, w in zip(self.params, self.w, strict=True):
                p.copy_(w)
        for p, gi in zip(self.params, g, strict=True):
            p.grad = gi
        self.base.step()
        for p in self.params:
            p.grad = None
        self.w = [p.detach().clone() for p in self.params]
        v = [self.base.state[p]["momentum_buffer"] for p in self.params]
        scale = self.rho / (norm(v) + EPS)
        with torch.no_grad():
            for p, vi in zip(self.params, v, strict=True):
                p.sub_(vi * scale)

    def unperturbed(self) -> list[torch.Tensor]:
        return self.w


def run(reference, model: nn.Module, batches) -> None:
    for x, y in batches:
        reference.step(model, x, y)
