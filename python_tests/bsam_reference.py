"""bSAM written eagerly from the paper (Moellenhoff and Khan, "SAM as an Optimal Relaxation of Bayes",
ICLR 2023, Algorithm 1), one tensor at a time, in float64, for the tests to compare ``BayesianSAM``
against. It draws no random numbers: the standard normals of each step are an input (the tests take them
from the noise contract), so it depends on nothing in the package.

One step, elementwise, with ``N`` the data size, ``delta`` the prior precision, ``gamma`` the damping:

    w~ = w + z / sqrt(N s);  g = grad L(w~)
    e = rho * g / s;         g_e = grad L(w + e)
    m = beta1 m + (1 - beta1) (g_e + delta w)
    s = beta2 s + (1 - beta2) (sqrt(s) |g| + delta + gamma)
    w = w - lr * m / s       (the updated s, as the paper's algorithm lists it)

A non-finite gradient in either pass leaves w, m and s as they were.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


class ReferenceBSAM:
    """Eager bSAM over float64 copies of ``params`` (leaf tensors), driven by ``loss_fn(params)``."""

    def __init__(self, params: Sequence[torch.Tensor], *, num_data: float, lr: float, betas=(0.9, 0.999),
                 rho: float = 0.01, weight_decay: float = 0.0, damping: float = 0.1,
                 init_precision: float = 1.0) -> None:
        self.params = [p.detach().double().clone().requires_grad_(True) for p in params]
        self.num_data, self.lr, self.rho = num_data, lr, rho
        self.beta1, self.beta2 = betas
        self.weight_decay, self.damping = weight_decay, damping
        self.exp_avgs = [torch.zeros_like(p) for p in self.params]
        self.precisions = [torch.full_like(p, init_precision) for p in self.params]

    def _grads(self, loss_fn: Callable, points: list[torch.Tensor]) -> list[torch.Tensor]:
        with torch.no_grad():
            for param, point in zip(self.params, points, strict=True):
                param.copy_(point)
        loss = loss_fn(self.params)
        return list(torch.autograd.grad(loss, self.params))

    def step(self, loss_fn: Callable, noises: Sequence[torch.Tensor]) -> None:
        """One step with the standard normals ``noises`` (one per parameter, its shape)."""
        means = [p.detach().clone() for p in self.params]
        samples = [w + z.double() / (self.num_data * s).sqrt()
                   for w, z, s in zip(means, noises, self.precisions, strict=True)]
        grads = self._grads(loss_fn, samples)
        ascended = [w + self.rho * g / s for w, g, s in zip(means, grads, self.precisions, strict=True)]
        grads_e = self._grads(loss_fn, ascended)
        finite = all(torch.isfinite(g).all() for g in grads + grads_e)
        with torch.no_grad():
            for i, param in enumerate(self.params):
                param.copy_(means[i])
                if not finite:
                    continue
                w, s = means[i], self.precisions[i]
                m = self.beta1 * self.exp_avgs[i] + (1 - self.beta1) * (grads_e[i] + self.weight_decay * w)
                s = self.beta2 * s + (1 - self.beta2) * (s.sqrt() * grads[i].abs() + self.weight_decay
                                                         + self.damping)
                self.exp_avgs[i], self.precisions[i] = m, s
                param.copy_(w - self.lr * m / s)
