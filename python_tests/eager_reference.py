"""The tests' independent reference: plain eager SAM-family steps written from docs/algorithms.md and
torch's AMP rules (one tensor at a time, float64 norms, backups by copy, torch.optim's own base optimizer
for the descent), the tiny models and data they run on, and a host-sync counter.

NOTE (independence): nothing here imports sam_kernels; every expected value of the optimizer tests comes
from the published definitions, not from the code under test.
"""

from __future__ import annotations

import contextlib
import copy
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

# ------------------------------------------------------------------------------- models and data


def make_model(seed: int = 0) -> nn.Module:
    """A tiny classifier with BatchNorm (a few hundred parameters, fast under the Triton interpreter).

    NOTE: no bias before the BatchNorm: its gradient would be rounding noise, which Adam amplifies to
    full-size steps, so no two implementations could agree on it.
    """
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 10, bias=False), nn.BatchNorm1d(10), nn.ReLU(), nn.Linear(10, 3))


def make_mlp(seed: int = 0) -> nn.Module:
    """A tiny MLP without BatchNorm (batch statistics would make micro-batches and shards differ)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3))


def make_batches(count: int, size: int = 12, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` batches of ``size`` samples for either model: 6 features, 3 classes."""
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 6, generator=generator), torch.randint(0, 3, (size,), generator=generator))
            for _ in range(count)]


def sample_losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy, in fp32 under autocast."""
    return F.cross_entropy(model(x).float(), y, reduction="none")


def batch_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return sample_losses(model, x, y).mean()


def closure_step(optimizer, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 calls: list | None = None):
    """One ``optimizer.step(closure)`` with torch.optim's closure convention (zero the gradients, the
    batch loss, backward, return the loss); returns what the step returns. ``calls`` counts the
    closure's calls (a SAM step makes two, a plain step of a schedule one)."""
    def closure():
        if calls is not None:
            calls.append(1)
        optimizer.zero_grad()
        loss = batch_loss(model, x, y)
        loss.backward()
        return loss
    return optimizer.step(closure)


def global_norm(grads) -> float:
    return math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))


def all_finite(grads) -> bool:
    return all(bool(torch.isfinite(g).all()) for g in grads)


def sds_count(gamma: float, batch: int) -> int:
    """ESAM's documented selection size: round(gamma * batch), halves up, at least one."""
    return max(1, min(batch, math.floor(gamma * batch + 0.5)))


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


# ------------------------------------------------------------------------------------- eager SAM


class ReferenceSAM:
    """SAM, ASAM, SSAM, USAM and ESAM's ascent per docs/algorithms.md over a torch.optim ``base`` on the
    same parameters.

    ``groups``: dicts with "params", "rho" and, for ASAM, "adaptive" and "eta". ``normalize=False``:
    USAM's ascent e = rho * g; ``renormalize``: SSAM's descent. ``ascent`` and ``descent`` are the two
    halves around the caller's backward passes; ``of_model`` builds one whose ``step`` runs them too.
    (The expected values of the tests; benchmarks/eager.py's ``EagerSAM`` is the popular implementation
    that the benchmarks time.)
    """

    def __init__(self, groups: list[dict], base: torch.optim.Optimizer, *, eps: float = 1e-12,
                 normalize: bool = True, renormalize: bool = False) -> None:
        self.groups, self.base = groups, base
        self.eps, self.normalize, self.renormalize = eps, normalize, renormalize
        self.model: nn.Module | None = None
        self.backups: dict[torch.Tensor, torch.Tensor] = {}

    @classmethod
    def of_model(cls, model: nn.Module, base: torch.optim.Optimizer, *, rho: float, loss=None,
                 **options) -> ReferenceSAM:
        """Every parameter of ``model`` in one group; ``step`` computes the losses with ``model`` and
        ``loss(model, x, y)`` (default ``batch_loss``)."""
        reference = cls([{"params": list(model.parameters()), "rho": rho}], base, **options)
        reference.model = model
        reference.loss = loss or batch_loss
        return reference

    @property
    def params(self) -> list[torch.Tensor]:
        return [p for group in self.groups for p in group["params"]]

    @staticmethod
    def _weight(p: torch.Tensor, group: dict) -> torch.Tensor | float:
        return p.detach().abs() + group["eta"] if group.get("adaptive", False) else 1.0

    @torch.no_grad()
    def ascent(self, kept: set | None = None, divisor: float = 1.0, masks: dict | None = None) -> None:
        """w <- w + e with the gradients in ``.grad``; ``kept`` limits the tensors (ESAM's per-tensor SWP,
        whose norm covers the kept ones only), ``divisor`` is beta there (scale rho / (||g|| + eps) /
        beta), ``masks`` maps a parameter to its elementwise keep mask (ESAM's elementwise SWP)."""
        active = [(p, g) for g in self.groups for p in g["params"]
                  if p.grad is not None and (kept is None or p in kept)]
        norm = global_norm(self._weight(p, group) * p.grad.double() for p, group in active)
        self.ascent_norm = global_norm(p.grad for p, _ in active)
        self.backups = {}
        for p, group in active:
            rho = group["rho"] / (norm + self.eps) if self.normalize else group["rho"]
            weight = self._weight(p, group)
            e = rho / divisor * weight * weight * p.grad
            if masks is not None:
                e = torch.where(masks[p], e, torch.zeros_like(e))
            self.backups[p] = p.clone()
            p.add_(e)

    @torch.no_grad()
    def restore(self) -> None:
        """w <- the copy the last ascent took."""
        for p, backup in self.backups.items():
            p.copy_(backup)

    @torch.no_grad()
    def descent(self) -> None:
        """Restore w by copy, then the base optimizer's step (SSAM: the gradient rescaled to the ascent
        gradient's norm first)."""
        self.restore()
        if self.renormalize:
            grads = [p.grad for p in self.params if p.grad is not None]
            factor = self.ascent_norm / (global_norm(grads) + self.eps)
            for g in grads:
                g.mul_(factor)
        self.base.step()

    def _grads(self) -> list[torch.Tensor]:
        return [p.grad for p in self.params if p.grad is not None]

    def _backward(self, batches, scale: float, autocast, corrupt) -> None:
        """``.grad`` = the gradient of the mean loss over ``batches``, taken with the loss multiplied by
        ``scale`` and unscaled afterwards (``corrupt`` sees the scaled gradients, as a scaler would)."""
        for p in self.params:
            p.grad = None
        with torch.enable_grad():
            for x, y in batches:
                with autocast() if autocast is not None else contextlib.nullcontext():
                    loss = self.loss(self.model, x, y) / len(batches)
                (loss * scale).backward()
        if corrupt is not None:
            corrupt(self.params)
        for g in self._grads():
            g.div_(scale)

    @torch.no_grad()
    def step(self, ascent_batches, descent_batches=None, *, scale: float = 1.0, autocast=None,
             corrupt_ascent=None, corrupt_descent=None, clip: float | None = None) -> bool:
        """One step of the model of ``of_model``; the loss of each pass is the mean over its micro-batches.

        ``scale`` mimics a loss scaler: a step with a non-finite gradient in either pass is skipped
        (weights restored, base state untouched). ``clip``: the descent gradient is clipped to this
        global norm before the descent. Returns whether the step was skipped.
        """
        descent_batches = ascent_batches if descent_batches is None else descent_batches
        self.backups = {}
        self._backward(ascent_batches, scale, autocast, corrupt_ascent)
        ascended = all_finite(self._grads())
        if ascended:
            self.ascent()
        self._backward(descent_batches, scale, autocast, corrupt_descent)
        descended = all_finite(self._grads())
        if clip is not None:
            coef = min(1.0, clip / (global_norm(self._grads()) + 1e-6))
            for g in self._grads():
                g.mul_(coef)
        if ascended and descended:
            self.descent()
            return False
        self.restore()
        return True


def sharp_gradient(ref: ReferenceSAM, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                   beta: float = 1.0, gamma: float = 1.0, kept: set | None = None,
                   masks: dict | None = None) -> torch.Tensor:
    """Backward at w (updates BatchNorm), ascent (divisor beta), backward at w + e (BatchNorm frozen) over
    the sds_count(gamma) sharpest samples (all of them at gamma 1). Leaves the weights at w + e and the
    descent's gradient in ``.grad``; returns the per-sample losses at w."""
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
    return before


def eager_sam_step(ref: ReferenceSAM, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One SAM iteration (``sharp_gradient``, then the descent). Returns the loss at w."""
    return eager_esam_step(ref, model, x, y, beta=1.0, gamma=1.0)


def eager_esam_step(ref: ReferenceSAM, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, beta: float,
                    gamma: float, kept: set | None = None, masks: dict | None = None) -> torch.Tensor:
    """One ESAM iteration per docs/algorithms.md (selection: exactly sds_count samples, sharpest first).
    Returns the loss at w."""
    before = sharp_gradient(ref, model, x, y, beta=beta, gamma=gamma, kept=kept, masks=masks)
    ref.descent()
    return before.mean()


def per_worker_step(model: nn.Module, base: torch.optim.Optimizer, shards, *, rho: float, beta: float = 1.0,
                    gamma: float = 1.0, dropped=(), eps: float = 1e-12) -> None:
    """Data-parallel SAM (ESAM with ``beta``, ``gamma`` and the ``dropped`` tensor positions) with a
    per-worker ascent, simulated in one process: worker r ascends from w with its own shard's gradient
    and takes the gradient of its shard (its sharpest samples) at its own w + e_r; the descent steps with
    the average of those gradients."""
    params = list(model.parameters())
    ref = ReferenceSAM([{"params": params, "rho": rho}], base, eps=eps)
    kept = {p for i, p in enumerate(params) if i not in dropped} if dropped else None
    total = [torch.zeros_like(p) for p in params]
    for x, y in shards:
        ref.restore()  # back to w from the previous worker's w + e
        sharp_gradient(ref, model, x, y, beta=beta, gamma=gamma, kept=kept)
        for t, p in zip(total, params, strict=True):
            t.add_(p.grad)
    for p, t in zip(params, total, strict=True):
        p.grad = t / len(shards)
    ref.descent()


# -------------------------------------------------------------------------------------- checks


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


class HostSyncCounter(TorchDispatchMode):
    """Context manager counting the ATen ops that read a tensor's value on the host (``item()``,
    ``bool()``, ``int()``, ``torch.equal``) in ``syncs``: on a GPU each one is a device-to-host sync."""

    SYNCING = ("aten::_local_scalar_dense", "aten::equal", "aten::is_nonzero")

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in self.SYNCING:
            self.syncs.append(func._schema.name)
        return func(*args, **(kwargs or {}))


# ----------------------------------------------------------------------------------- cheap SAM
# The variants that skip or replace the second pass (docs/algorithms.md, "Cheap SAM"). A run is
# ``run(reference, model, batches)``: ``reference.step(model, x, y)`` computes its own gradients (one or
# two passes) and updates the model in place.

CHEAP_EPS = 1e-12


def gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """The gradients of the batch loss at the model's current weights (the model's .grad is left None)."""
    params = list(model.parameters())
    for p in params:
        p.grad = None
    batch_loss(model, x, y).backward()
    grads = [p.grad.detach().clone() for p in params]
    for p in params:
        p.grad = None
    return grads


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


def sam_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, g: list[torch.Tensor],
                 rho: float) -> list[torch.Tensor]:
    """The gradient at w + rho * g / (||g|| + eps), the weights copied back afterwards."""
    params = list(model.parameters())
    saved = [p.detach().clone() for p in params]
    scale = rho / (global_norm(g) + CHEAP_EPS)
    with torch.no_grad():
        for p, gi in zip(params, g, strict=True):
            p.add_(gi * scale)
    sharp = gradients(model, x, y)
    with torch.no_grad():
        for p, w in zip(params, saved, strict=True):
            p.copy_(w)
    return sharp


def base_step(base: torch.optim.Optimizer, params: list[torch.Tensor], update: list[torch.Tensor]) -> None:
    """torch.optim's own step with ``update`` as the gradients."""
    for p, u in zip(params, update, strict=True):
        p.grad = u
    base.step()
    for p in params:
        p.grad = None


class ScheduledSAM:
    """SAM on the steps ``decide(t, ||g||^2)`` picks, a plain base step with g on the others."""

    def __init__(self, model: nn.Module, base: torch.optim.Optimizer, rho: float, decide) -> None:
        self.params = list(model.parameters())
        self.base, self.rho, self.decide = base, rho, decide
        self.t = 0
        self.sam_steps: list[bool] = []

    def step(self, model, x, y) -> None:
        g = gradients(model, x, y)
        sam = self.decide(self.t, global_norm(g) ** 2)
        self.sam_steps.append(sam)
        if sam:
            g = sam_gradient(model, x, y, g, self.rho)
        base_step(self.base, self.params, g)
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
            gs = sam_gradient(model, x, y, g, self.rho)
            c = dot(g, gs) / global_norm(g) ** 2
            self.gv = [s.double() - c * gi.double() for s, gi in zip(gs, g, strict=True)]
            update = gs
        else:
            coefficient = self.alpha * global_norm(g) / (global_norm(self.gv) + CHEAP_EPS)
            update = [(gi.double() + coefficient * v).to(gi.dtype) for gi, v in zip(g, self.gv, strict=True)]
        base_step(self.base, self.params, update)
        self.t += 1


class EagerMSAM:
    """Momentum SAM over torch.optim.SGD: the gradient at w~ = w - rho * v / (||v|| + eps), then the SGD
    step from w (weight decay at w, torch's convention), then w~ from the new v."""

    #: The optimizer-state entry the perturbation runs along.
    direction = "momentum_buffer"

    def __init__(self, model: nn.Module, lr: float, momentum: float, rho: float,
                 weight_decay: float = 0.0) -> None:
        self._start(model, torch.optim.SGD, rho, lr=lr, momentum=momentum, weight_decay=weight_decay)

    def _start(self, model: nn.Module, base_cls: type, rho: float, **options) -> None:
        self.params = list(model.parameters())
        self.w = [p.detach().clone() for p in self.params]
        self.base = base_cls(self.params, **options)
        self.rho = rho

    def step(self, model, x, y) -> None:
        g = gradients(model, x, y)  # at w~ (the model holds w~ between steps)
        with torch.no_grad():
            for p, w in zip(self.params, self.w, strict=True):
                p.copy_(w)
        base_step(self.base, self.params, g)
        self.w = [p.detach().clone() for p in self.params]
        v = [self.base.state[p][self.direction] for p in self.params]
        scale = self.rho / (global_norm(v) + CHEAP_EPS)
        with torch.no_grad():
            for p, vi in zip(self.params, v, strict=True):
                p.sub_(vi * scale)

    def unperturbed(self) -> list[torch.Tensor]:
        return self.w


class EagerAdamMSAM(EagerMSAM):
    """Momentum SAM over torch.optim.Adam or AdamW (the authors' AdamW_MSAM, MarlonBecker/MSAM): the
    gradient at w~ = w - rho * m / (||m|| + eps), m Adam's first moment ``exp_avg`` as torch keeps it (not
    bias corrected, rho not scaled by the learning rate), then torch's own Adam/AdamW step from w (its
    weight decay at w, decoupled for AdamW: torch's order, decay before the update), then w~ from the new
    m. The first step (no m yet) takes its gradient at w."""

    direction = "exp_avg"

    def __init__(self, model: nn.Module, base_cls: type, rho: float, **options) -> None:
        self._start(model, base_cls, rho, **options)


def run(reference, model: nn.Module, batches) -> None:
    for x, y in batches:
        reference.step(model, x, y)
