"""Plain eager references for the SAM variants that change the ascent or the descent direction (GSAM,
WSAM, Friendly-SAM, VaSSO, Fisher-SAM, GC-SAM), for GSAM's proportional rho schedule, and for those that
change a step's structure (multi-step ascent, micro-batches: at the end, with their own ``step``), each
written from its paper's definition in the notation of docs/algorithms.md: w the weights, g the minibatch
gradient at w, e the perturbation, g_s the gradient at w + e, ‖·‖ the global L2 norm over every parameter.

Each class runs one full iteration in ``step(model, x, y)``: the gradient at w (BatchNorm statistics
updated), the ascent from a copy of w, the gradient at w + e (BatchNorm frozen), w restored by copy, and
torch.optim's own base optimizer stepping with the variant's descent gradient. Norms and inner products
accumulate in float64, one tensor at a time. A non-finite gradient in either pass skips the step: the
weights are restored and nothing else changes, neither the base optimizer's state nor the variant's own
buffers (``state``), which are committed only once the step is taken.

NOTE (independence): nothing here imports sam_kernels; the helpers come from eager_reference.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from eager_reference import FrozenBatchNorm, all_finite, base_step, dot, global_norm, gradients
from torch import nn

EPS = 1e-12

#: ``corrupt(grads)``: writes into the gradients of one pass in place (a non-finite value, in the tests).
Corrupt = Callable[[list[torch.Tensor]], None]


def poison(value: float) -> Corrupt:
    """A ``corrupt`` that writes ``value`` into the first element of the first gradient."""
    def corrupt(grads: list[torch.Tensor]) -> None:
        grads[0].view(-1)[0] = value
    return corrupt


def scaled(vectors: list[torch.Tensor], rho: float, eps: float = EPS) -> list[torch.Tensor]:
    """rho * u / (‖u‖ + eps) for the vectors u together, in float64."""
    scale = rho / (global_norm(vectors) + eps)
    return [u.double() * scale for u in vectors]


def proportional_rho(lr: float, *, rho_max: float, rho_min: float, lr_max: float, lr_min: float) -> float:
    """GSAM's schedule: rho moves with the learning rate, rho_max at lr_max and rho_min at lr_min."""
    return rho_min + (rho_max - rho_min) * (lr - lr_min) / (lr_max - lr_min)


class EagerVariant:
    """The iteration shared by the variants; subclasses define ``perturbation`` (e from g, and the own
    buffers that the step commits when it is taken), ``descent`` (the gradient the base optimizer steps
    with) and, where the paper has one, ``after_descent`` (an update outside the base optimizer).

    Every parameter of ``model`` must receive a gradient in both passes (true of the tests' models).
    ``rho`` may be changed between steps (a rho schedule).
    """

    def __init__(self, model: nn.Module, base: torch.optim.Optimizer, *, rho: float = 0.05,
                 eps: float = EPS) -> None:
        self.params = list(model.parameters())
        self.base, self.rho, self.eps = base, rho, eps
        self.state: dict[torch.Tensor, dict[str, torch.Tensor]] = {p: {} for p in self.params}
        self.skipped: list[bool] = []

    def perturbation(self, g: list[torch.Tensor]) -> tuple[list[torch.Tensor], dict]:
        raise NotImplementedError

    def descent(self, g: list[torch.Tensor], gs: list[torch.Tensor]) -> list[torch.Tensor]:
        return gs

    def after_descent(self, g: list[torch.Tensor], gs: list[torch.Tensor]) -> None:
        pass

    def step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
             corrupt_ascent: Corrupt | None = None, corrupt_descent: Corrupt | None = None) -> bool:
        """One iteration on the batch (x, y); returns whether it was skipped."""
        g = gradients(model, x, y)
        if corrupt_ascent is not None:
            corrupt_ascent(g)
        if not all_finite(g):  # no ascent; the caller's second pass at w changes nothing either
            self.skipped.append(True)
            return True
        e, pending = self.perturbation(g)
        backups = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, ei in zip(self.params, e, strict=True):
                p.add_(ei.to(p.dtype))
        with FrozenBatchNorm(model):
            gs = gradients(model, x, y)
        if corrupt_descent is not None:
            corrupt_descent(gs)
        with torch.no_grad():
            for p, backup in zip(self.params, backups, strict=True):
                p.copy_(backup)
        if not all_finite(gs):
            self.skipped.append(True)
            return True
        for p, buffers in pending.items():
            self.state[p].update(buffers)
        base_step(self.base, self.params, [d.to(p.dtype) for p, d in zip(self.params, self.descent(g, gs),
                                                                          strict=True)])
        self.after_descent(g, gs)
        self.skipped.append(False)
        return False


class EagerSAMStep(EagerVariant):
    """Plain SAM in this form: e = rho g / (‖g‖ + eps), descent with g_s."""

    def perturbation(self, g):
        return scaled(g, self.rho, self.eps), {}


class EagerGSAM(EagerSAMStep):
    """GSAM (Zhuang et al., ICLR 2022, arXiv 2203.08065): SAM's ascent; the descent gradient is
    d = g_s - alpha * g_perp with g_perp = g - (<g, g_s> / (‖g_s‖² + eps)) g_s, the part of g orthogonal
    to g_s, the inner product and the norm global."""

    def __init__(self, model, base, *, rho: float = 0.05, alpha: float = 0.2, eps: float = EPS) -> None:
        super().__init__(model, base, rho=rho, eps=eps)
        self.alpha = alpha

    def descent(self, g, gs):
        c = dot(g, gs) / (global_norm(gs) ** 2 + self.eps)
        return [s.double() - self.alpha * (gi.double() - c * s.double()) for gi, s in zip(g, gs, strict=True)]


class EagerWSAM(EagerSAMStep):
    """WSAM (Yue et al., KDD 2023, arXiv 2305.15817), the sharpness term weighted by
    alpha = gamma / (1 - gamma). ``decoupled``: the base optimizer steps with g, then
    w -= lr * alpha * (g_s - g) with the group's lr, outside momentum and weight decay; otherwise the base
    optimizer steps with alpha g_s + (1 - alpha) g."""

    def __init__(self, model, base, *, rho: float = 0.05, gamma: float = 0.9, decoupled: bool = True,
                 eps: float = EPS) -> None:
        super().__init__(model, base, rho=rho, eps=eps)
        self.alpha, self.decoupled = gamma / (1 - gamma), decoupled

    def descent(self, g, gs):
        if self.decoupled:
            return g
        return [self.alpha * s.double() + (1 - self.alpha) * gi.double() for gi, s in zip(g, gs, strict=True)]

    def after_descent(self, g, gs):
        if not self.decoupled:
            return
        lr = {p: group["lr"] for group in self.base.param_groups for p in group["params"]}
        with torch.no_grad():
            for p, gi, s in zip(self.params, g, gs, strict=True):
                p.sub_((lr[p] * self.alpha * (s.double() - gi.double())).to(p.dtype))


class EagerFriendlySAM(EagerVariant):
    """Friendly-SAM (Li et al., CVPR 2024, arXiv 2403.12350): m, an EMA of the raw gradients, estimates
    the full-batch gradient; the ascent follows the batch-specific part u = g - sigma * m_{t-1}, then
    m = lambd m + (1 - lambd) g. On a parameter's first step m = g and the ascent is SAM's. Descent with
    g_s."""

    def __init__(self, model, base, *, rho: float = 0.05, sigma: float = 1.0, lambd: float = 0.9,
                 eps: float = EPS) -> None:
        super().__init__(model, base, rho=rho, eps=eps)
        self.sigma, self.lambd = sigma, lambd

    def perturbation(self, g):
        u, pending = [], {}
        for p, gi in zip(self.params, g, strict=True):
            m = self.state[p].get("m")
            if m is None:
                u.append(gi.double())
                pending[p] = {"m": gi.clone()}
            else:
                u.append(gi.double() - self.sigma * m.double())
                pending[p] = {"m": (self.lambd * m.double() + (1 - self.lambd) * gi.double()).to(m.dtype)}
        return scaled(u, self.rho, self.eps), pending


class EagerVaSSO(EagerVariant):
    """VaSSO (Li and Giannakis, NeurIPS 2023, arXiv 2309.15639): the ascent follows d, an EMA of the
    gradients (d = g on a parameter's first step, then d = (1 - theta) d + theta g), e = rho d / (‖d‖ + eps).
    Descent with g_s."""

    def __init__(self, model, base, *, rho: float = 0.05, theta: float = 0.9, eps: float = EPS) -> None:
        super().__init__(model, base, rho=rho, eps=eps)
        self.theta = theta

    def perturbation(self, g):
        d, pending = [], {}
        for p, gi in zip(self.params, g, strict=True):
            old = self.state[p].get("d")
            new = gi.clone() if old is None else ((1 - self.theta) * old.double()
                                                  + self.theta * gi.double()).to(old.dtype)
            d.append(new)
            pending[p] = {"d": new}
        return scaled(d, self.rho, self.eps), pending


class EagerFisherSAM(EagerVariant):
    """Fisher-SAM (Kim et al., ICML 2022, arXiv 2206.04920) with the diagonal Fisher metric 1 + eta g²:
    e = rho * (g / (1 + eta g²)) / sqrt(sum(g² / (1 + eta g²)) + eps), elementwise, the sum global.
    Descent with g_s."""

    def __init__(self, model, base, *, rho: float = 0.05, eta: float = 1.0, eps: float = EPS) -> None:
        super().__init__(model, base, rho=rho, eps=eps)
        self.eta = eta

    def perturbation(self, g):
        g64 = [gi.double() for gi in g]
        total = sum(float((gi * gi / (1 + self.eta * gi * gi)).sum()) for gi in g64)
        scale = self.rho / (total + self.eps) ** 0.5
        return [scale * gi / (1 + self.eta * gi * gi) for gi in g64], {}


def centred(g: torch.Tensor) -> torch.Tensor:
    """GC-SAM's gradient centralization: a tensor with more than one dimension loses its mean over every
    dimension but the first (per output row); a 1-d tensor is returned as it is. In float64."""
    g = g.double()
    if g.dim() <= 1:
        return g
    return g - g.mean(dim=tuple(range(1, g.dim())), keepdim=True)


class EagerGCSAM(EagerVariant):
    """GC-SAM (arXiv 2501.11584): the ascent gradient is centred (``centred``) before the norm and the
    perturbation, e = rho c(g) / (‖c(g)‖ + eps). Descent with g_s, not centred."""

    def perturbation(self, g):
        return scaled([centred(gi) for gi in g], self.rho, self.eps), {}



#: The variants and the options the optimizer tests run them with (chosen so that each run differs from
#: SAM's by far more than the comparison tolerance; test_variant_reference.py checks that).
SETTINGS: dict[str, tuple[type[EagerVariant], dict]] = {
    "gsam": (EagerGSAM, {"rho": 0.1, "alpha": 0.3}),
    "wsam": (EagerWSAM, {"rho": 0.1, "gamma": 0.8}),
    "wsam_coupled": (EagerWSAM, {"rho": 0.1, "gamma": 0.8, "decoupled": False}),
    "friendly": (EagerFriendlySAM, {"rho": 0.1, "sigma": 1.0, "lambd": 0.6}),
    "vasso": (EagerVaSSO, {"rho": 0.1, "theta": 0.4}),
    "fisher": (EagerFisherSAM, {"rho": 0.1, "eta": 20.0}),
    "gcsam": (EagerGCSAM, {"rho": 0.1}),
}


# ------------------------------------------------------------------ variants that change a step's structure


def _move(params: list[torch.Tensor], values: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for p, value in zip(params, values, strict=True):
            p.copy_(value.to(p.dtype))


class EagerMultiStepSAM:
    """Multi-step SAM: n normalized ascent steps of length a * rho, each from the current perturbed point
    along its own gradient, projected on the rho-ball after each: e_j = P(e_{j-1} + a rho g_j / (‖g_j‖ +
    eps)), P(e) = e * min(1, rho / (‖e‖ + eps)); the base optimizer steps from w with the gradient at
    w + e_n. BatchNorm statistics are updated in the first pass only. A non-finite gradient in any pass
    skips the step (w restored)."""

    def __init__(self, model: nn.Module, base: torch.optim.Optimizer, *, rho: float = 0.05, steps: int = 2,
                 step_size: float | None = None, eps: float = EPS, project: bool = True) -> None:
        self.params = list(model.parameters())
        self.base, self.rho, self.steps, self.eps, self.project = base, rho, steps, eps, project
        self.step_size = 1.0 / steps if step_size is None else step_size
        self.skipped: list[bool] = []

    def step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, corrupt_at: int | None = None,
             value: float = math.nan) -> bool:
        """One iteration; ``corrupt_at``: the pass (0 .. n) whose gradient gets ``value``."""
        w = [p.detach().clone() for p in self.params]
        e = [torch.zeros_like(p, dtype=torch.float64) for p in self.params]
        finite = True
        for j in range(self.steps + 1):
            if j == 0:
                g = gradients(model, x, y)
            else:
                with FrozenBatchNorm(model):
                    g = gradients(model, x, y)
            if corrupt_at == j:
                poison(value)(g)
            finite = finite and all_finite(g)
            if j == self.steps or not finite:
                break
            moved = [ei + u for ei, u in zip(e, scaled(g, self.rho * self.step_size, self.eps), strict=True)]
            factor = min(1.0, self.rho / (global_norm(moved) + self.eps)) if self.project else 1.0
            e = [m * factor for m in moved]
            _move(self.params, [wi.double() + ei for wi, ei in zip(w, e, strict=True)])
        _move(self.params, w)
        self.skipped.append(not finite)
        if finite:
            base_step(self.base, self.params, g)
        return not finite


class EagerMicroBatchSAM:
    """Micro-batch SAM (m-sharpness, Foret et al. 2021): for each micro-batch (x_i, y_i) of a step, the
    gradient g_i of loss_i * scale at w, e_i = rho g_i / (‖g_i‖ + eps), the gradient of loss_i * scale at
    w + e_i (BatchNorm frozen), summed in float64 over the micro-batches; the base optimizer steps from w
    with the sum. ``scale``: the loss factor (1/k for the mean). A non-finite gradient anywhere skips the
    step. ``plain``: the step is a plain one (a schedule said no), the sum of the g_i."""

    def __init__(self, model: nn.Module, base: torch.optim.Optimizer, *, rho: float = 0.05,
                 eps: float = EPS, loss: Callable | None = None, ascent_steps: int = 1) -> None:
        self.params = list(model.parameters())
        self.base, self.rho, self.eps, self.loss = base, rho, eps, loss
        #: Multi-step ascents per micro-batch: n normalized steps of rho / n (EagerMultiStepSAM's, which
        #: never leave the ball), each from the current point along its own gradient (BatchNorm frozen).
        self.ascent_steps = ascent_steps

    def gradients(self, model: nn.Module, x, y) -> list[torch.Tensor]:
        """The gradients of ``loss(model, x, y)`` (the batch loss by default) at the current weights."""
        if self.loss is None:
            return gradients(model, x, y)
        for p in self.params:
            p.grad = None
        self.loss(model, x, y).backward()
        grads = [p.grad.detach().clone() for p in self.params]
        for p in self.params:
            p.grad = None
        return grads

    def step(self, model: nn.Module, micro_batches: list, *, scale: float = 1.0, plain: bool = False,
             corrupt: tuple[int, int, float] | None = None) -> bool:
        """One iteration; ``corrupt``: (micro-batch, pass 0 or 1, value) written into that gradient."""
        w = [p.detach().clone() for p in self.params]
        total = [torch.zeros_like(p, dtype=torch.float64) for p in self.params]
        finite = True
        for index, (x, y) in enumerate(micro_batches):
            g = [gi * scale for gi in self.gradients(model, x, y)]
            if corrupt is not None and corrupt[:2] == (index, 0):
                poison(corrupt[2])(g)
            finite = finite and all_finite(g)
            if not plain:
                e = [torch.zeros_like(p, dtype=torch.float64) for p in self.params]
                for j in range(self.ascent_steps):
                    if j > 0:
                        with FrozenBatchNorm(model):
                            g = [gi * scale for gi in self.gradients(model, x, y)]
                        finite = finite and all_finite(g)
                    if all_finite(g):
                        step = scaled(g, self.rho / self.ascent_steps, self.eps)
                        e = [ei + si for ei, si in zip(e, step, strict=True)]
                        _move(self.params, [wi.double() + ei for wi, ei in zip(w, e, strict=True)])
                with FrozenBatchNorm(model):
                    g = [gi * scale for gi in self.gradients(model, x, y)]
                if corrupt is not None and corrupt[:2] == (index, 1):
                    poison(corrupt[2])(g)
                finite = finite and all_finite(g)
                _move(self.params, w)
            total = [t + gi.double() for t, gi in zip(total, g, strict=True)]
        if finite:
            base_step(self.base, self.params,
                      [t.to(p.dtype) for t, p in zip(total, self.params, strict=True)])
        return not finite
