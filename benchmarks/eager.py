"""Eager baselines, written the way the widely used public implementations write them.

``EagerSAM`` follows the popular per-tensor PyTorch SAM (first_step / second_step, a Python loop over the
parameters, a clone per tensor for the backup). ``EagerESAM`` follows the official ESAM code's
semantics (docs/algorithms.md): per-tensor stochastic weight perturbation by switching requires_grad
off, a no-grad forward at w + e in train mode, selection with a strict ">" against the k-th largest
sharpness (k - 1 samples), and the weights restored by subtracting e.

Every benchmark's eager baseline is one of these two classes (``optimizer_step`` times their optimizer
side with the gradients in place, ``training`` whole steps).
"""

from __future__ import annotations

import random

import torch


class EagerSAM(torch.optim.Optimizer):
    """Per-tensor SAM: ``first_step()`` perturbs w by e = rho * g / ||g||, ``second_step()`` puts w back
    and takes the base optimizer's step."""

    def __init__(self, params, base_optimizer, rho=0.05, **kwargs):
        super().__init__(params, dict(rho=rho, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups

    @torch.no_grad()
    def first_step(self, zero_grad=False):
        grad_norm = self._grad_norm()
        for group in self.param_groups:
            scale = group["rho"] / (grad_norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.data.clone()
                # NOTE (baseline ops): the 1.0 is the popular code's ASAM weight (w^2 when adaptive), an
                # ATen multiply per tensor that a faithful baseline keeps.
                p.add_(1.0 * p.grad * scale.to(p))
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad=False):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.data = self.state[p]["old_p"]
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    def _grad_norm(self):
        return torch.norm(torch.stack([p.grad.norm(p=2) for group in self.param_groups
                                       for p in group["params"] if p.grad is not None]), p=2)


class EagerESAM(torch.optim.Optimizer):
    """Per-tensor ESAM. ``step_with`` is a whole step; its optimizer side alone is ``drop_tensors()``,
    ``first_step()``, ``keep_all_tensors()``, ``second_step()`` with the gradients in place."""

    def __init__(self, params, base_optimizer, rho=0.05, beta=0.6, gamma=0.5, seed=0, **kwargs):
        super().__init__(params, dict(rho=rho, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.beta, self.gamma = beta, gamma
        self.rng = random.Random(seed)

    def _params(self):
        return [p for group in self.param_groups for p in group["params"]]

    def drop_tensors(self):
        """SWP: each tensor is kept with probability beta; a dropped one stops requiring grad, so the
        ascent backward skips its weight gradient."""
        for p in self._params():
            p.requires_grad_(self.rng.random() < self.beta)

    def keep_all_tensors(self):
        for p in self._params():
            p.requires_grad_(True)

    @torch.no_grad()
    def first_step(self):
        """w <- w + e on the kept tensors, e = rho * g / (||g_kept|| + 1e-12) / beta."""
        kept = [p for p in self._params() if p.requires_grad and p.grad is not None]
        if not kept:
            return
        grad_norm = torch.norm(torch.stack([p.grad.norm(p=2) for p in kept]), p=2)
        for group in self.param_groups:
            scale = group["rho"] / (grad_norm + 1e-12) / self.beta
            for p in group["params"]:
                if p.requires_grad and p.grad is not None:
                    self.state[p]["e_w"] = p.grad * scale
                    p.add_(self.state[p]["e_w"])

    @torch.no_grad()
    def second_step(self):
        """w <- w - e, then the base optimizer's step."""
        for p in self._params():
            if "e_w" in self.state[p]:
                p.sub_(self.state[p].pop("e_w"))
        self.base_optimizer.step()

    def step_with(self, model, loss_fn, inputs, targets):
        """One ESAM step; ``loss_fn`` returns per-sample losses (reduction='none')."""
        self.drop_tensors()
        loss_before = loss_fn(model(inputs), targets)
        loss_before.mean().backward()
        self.first_step()
        with torch.no_grad():
            loss_after = loss_fn(model(inputs), targets)  # train mode, as the official code
            sharpness = loss_after - loss_before.detach()
            k = int(len(inputs) * self.gamma)
            threshold = torch.topk(sharpness, k).values[-1]
            selected = sharpness > threshold
        self.keep_all_tensors()
        self.zero_grad()
        loss = loss_fn(model(inputs[selected]), targets[selected]).mean()
        loss.backward()
        self.second_step()
        self.zero_grad()
        return loss
