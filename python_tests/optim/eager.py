"""Plain eager SAM-family optimizers written from docs/algorithms.md: one tensor at a time, backups
by copy, torch.optim's own base optimizer for the descent. Independent of sam_kernels.optim.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn


def make_model(seed: int = 0) -> nn.Module:
    """A tiny classifier with BatchNorm (a few hundred parameters, fast under the Triton interpreter).

    NOTE: no bias before the BatchNorm: its gradient would be rounding noise, which Adam amplifies to
    full-size steps, so no two implementations could agree on it.
    """
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 10, bias=False), nn.BatchNorm1d(10), nn.ReLU(), nn.Linear(10, 3))


def make_batches(count: int, size: int = 12, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 6, generator=generator), torch.randint(0, 3, (size,), generator=generator))
            for _ in range(count)]


def sample_losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y, reduction="none")


def batch_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return sample_losses(model, x, y).mean()


class FrozenBatchNorm:
    """Context manager: save every BatchNorm buffer before the block and copy it back afterwards."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def __enter__(self) -> None:
        self.saved = [[b.clone() for b in layer.buffers()] for layer in self.layers]

    def __exit__(self, *exc) -> None:
        with torch.no_grad():
            for layer, saved in zip(self.layers, self.saved, strict=True):
                for buffer, value in zip(layer.buffers(), saved, strict=True):
                    buffer.copy_(value)


class EagerSAM:
    """SAM, ASAM, SSAM and USAM per docs/algorithms.md.

    ``groups``: dicts with "params", "rho", "adaptive", "eta". ``base``: a torch.optim optimizer over the
    same parameters. ``keep``: optional per-step (kept tensors, per-tensor scale divisor, element masks)
    for ESAM.
    """

    def __init__(self, groups: list[dict], base: torch.optim.Optimizer, *, eps: float = 1e-12,
                 normalize: bool = True, renormalize: bool = False) -> None:
        self.groups, self.base = groups, base
        self.eps, self.normalize, self.renormalize = eps, normalize, renormalize
        self.backups: dict[torch.Tensor, torch.Tensor] = {}

    @staticmethod
    def _weight(p: torch.Tensor, group: dict) -> torch.Tensor | float:
        return p.detach().abs() + group["eta"] if group["adaptive"] else 1.0

    @torch.no_grad()
    def ascent(self, kept: set | None = None, divisor: float = 1.0, masks: dict | None = None) -> None:
        """w <- w + e; ``kept`` limits the tensors (ESAM's per-tensor SWP), ``divisor`` is beta there,
        ``masks`` maps a parameter to its elementwise keep mask (ESAM's elementwise SWP)."""
        active = [(p, g) for g in self.groups for p in g["params"]
                  if p.grad is not None and (kept is None or p in kept)]
        total = 0.0
        plain = 0.0
        for p, group in active:
            total += float(((self._weight(p, group) * p.grad.double()) ** 2).sum())
            plain += float((p.grad.double() ** 2).sum())
        norm, self.ascent_norm = math.sqrt(total), math.sqrt(plain)
        self.backups = {}
        for p, group in active:
            scale = group["rho"] / (norm + self.eps) if self.normalize else group["rho"]
            weight = self._weight(p, group)
            e = scale * weight * weight * p.grad / divisor
            if masks is not None:
                e = torch.where(masks[p], e, torch.zeros_like(e))
            self.backups[p] = p.clone()
            p.add_(e)

    @torch.no_grad()
    def descent(self) -> None:
        """Restore w by copy, then the base optimizer's step (SSAM: the gradient rescaled first)."""
        for p, backup in self.backups.items():
            p.copy_(backup)
        if self.renormalize:
            grads = [p.grad for g in self.groups for p in g["params"] if p.grad is not None]
            norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))
            for g in grads:
                g.mul_(self.ascent_norm / (norm + self.eps))
        self.base.step()


def eager_sam_step(ref: EagerSAM, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                   **ascent) -> torch.Tensor:
    """One SAM iteration: backward at w (updates BatchNorm), ascent, backward at w + e (BatchNorm frozen),
    descent. Returns the loss at w."""
    ref.base.zero_grad()
    loss = batch_loss(model, x, y)
    loss.backward()
    ref.ascent(**ascent)
    ref.base.zero_grad()
    with FrozenBatchNorm(model):
        batch_loss(model, x, y).backward()
    ref.descent()
    return loss.detach()


def sds_count(gamma: float, batch: int) -> int:
    """ESAM's documented selection size: round(gamma * batch), halves up, at least one."""
    return max(1, min(batch, math.floor(gamma * batch + 0.5)))


def eager_esam_step(ref: EagerSAM, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, beta: float,
                    gamma: float, kept: set | None = None, masks: dict | None = None) -> torch.Tensor:
    """One ESAM iteration per docs/algorithms.md (selection: exactly sds_count samples, sharpest first)."""
    ref.base.zero_grad()
    before = sample_losses(model, x, y)
    before.mean().backward()
    before = before.detach()
    ref.ascent(kept=kept, divisor=beta, masks=masks)
    ref.base.zero_grad()
    count = sds_count(gamma, len(y))
    if count < len(y):
        with torch.no_grad(), FrozenBatchNorm(model):
            after = sample_losses(model, x, y)
        order = torch.argsort(after - before, descending=True, stable=True)
        chosen = torch.sort(order[:count]).values
        x, y = x[chosen], y[chosen]
    with FrozenBatchNorm(model):
        batch_loss(model, x, y).backward()
    ref.descent()
    return before.mean()


def clone_model(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def assert_models_close(actual: nn.Module, expected: nn.Module, *, rtol: float = 1e-5,
                        atol: float = 1e-6) -> None:
    """Parameters and buffers (BatchNorm statistics included) of two models match."""
    for (name, a), b in zip(actual.state_dict().items(), expected.state_dict().values(), strict=True):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")
        else:
            assert torch.equal(a, b), name


def assert_models_equal(actual: nn.Module, expected: nn.Module) -> None:
    for (name, a), b in zip(actual.state_dict().items(), expected.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
