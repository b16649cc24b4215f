"""torch.optim's step hooks run exactly once per SAM step, in every calling style: the pre-hooks before
the ascent, the post-hooks after the descent (what EMA, logging and scheduler callbacks rely on)."""

from __future__ import annotations

import pytest
import torch
from eager_reference import batch_loss, closure_step, make_batches, make_model
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from sam_kernels.optim import ESAM, SAM, sample_losses_closure

from .test_esam import per_sample_cross_entropy
from .test_sam import two_call_step


class HookLog:
    """Records every hook call with the weights of the first parameter at that moment."""

    def __init__(self, optimizer) -> None:
        self.calls: list[tuple[str, torch.Tensor]] = []
        self.param = optimizer.param_groups[0]["params"][0]
        self.handles = [optimizer.register_step_pre_hook(self.hook("pre")),
                        optimizer.register_step_post_hook(self.hook("post")),
                        register_optimizer_step_pre_hook(self.hook("global pre")),
                        register_optimizer_step_post_hook(self.hook("global post"))]

    def hook(self, name):
        def record(optimizer, args, kwargs):
            self.calls.append((name, self.param.detach().clone()))
        return record

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def sds(optimizer, model, x, y):
    optimizer.sds_step(sample_losses_closure(model, x, y, per_sample_cross_entropy))


def scaler_step(optimizer, model, x, y):
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    scaler.scale(batch_loss(model, x, y)).backward()
    optimizer.first_step(zero_grad=True, grad_scaler=scaler)
    scaler.scale(batch_loss(model, x, y)).backward()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad()


def step_descent(optimizer, model, x, y):
    """first_step, then step() as the descent (the form GradScaler.step uses)."""
    batch_loss(model, x, y).backward()
    optimizer.first_step(zero_grad=True)
    batch_loss(model, x, y).backward()
    optimizer.step()
    optimizer.zero_grad()


STYLES = {
    "sam-step-descent": (lambda m: SAM(m.parameters(), torch.optim.SGD, lr=0.1), step_descent),
    "sam-two-call": (lambda m: SAM(m.parameters(), torch.optim.SGD, lr=0.1), two_call_step),
    "sam-closure": (lambda m: SAM(m.parameters(), torch.optim.AdamW, lr=0.01), closure_step),
    "sam-grad-scaler": (lambda m: SAM(m.parameters(), torch.optim.SGD, lr=0.1), scaler_step),
    "esam-closure": (lambda m: ESAM(m.parameters(), torch.optim.SGD, lr=0.1, gamma=1.0), closure_step),
    "esam-sds": (lambda m: ESAM(m.parameters(), torch.optim.SGD, lr=0.1, gamma=0.5), sds),
    "sam-generic": (lambda m: SAM(m.parameters(), torch.optim.RMSprop, lr=0.01), two_call_step),
}


@pytest.mark.parametrize("style", STYLES)
def test_step_hooks_run_once_per_sam_step(style):
    make, step = STYLES[style]
    model = make_model()
    optimizer = make(model)
    log = HookLog(optimizer)
    try:
        for x, y in make_batches(3):
            before = log.param.detach().clone()
            step(optimizer, model, x, y)
            calls = log.calls[-4:]
            assert sorted(name for name, _ in calls) == ["global post", "global pre", "post", "pre"]
            for name, weights in calls:
                if name.endswith("pre"):
                    assert torch.equal(weights, before), f"{name} ran after the weights moved"
                else:
                    assert torch.equal(weights, log.param.detach()), f"{name} ran before the descent"
        assert len(log.calls) == 4 * 3, log.names()
    finally:
        log.remove()


def test_a_hook_based_ema_follows_the_two_call_loop():
    """An exponential moving average of the weights kept by a post-hook (the way EMA callbacks hook
    into an optimizer) equals the one computed by hand after each step."""
    model = make_model()
    sam = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    params = list(model.parameters())
    ema = [p.detach().clone() for p in params]

    def update(optimizer, args, kwargs):
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 0.1)

    handle = sam.register_step_post_hook(update)
    expected = [p.detach().clone() for p in params]
    for x, y in make_batches(4):
        two_call_step(sam, model, x, y)
        expected = [e + 0.1 * (p.detach() - e) for e, p in zip(expected, params, strict=True)]
    handle.remove()
    for a, b in zip(ema, expected, strict=True):
        torch.testing.assert_close(a, b)
    assert not all(torch.equal(a, p) for a, p in zip(ema, params, strict=True))
