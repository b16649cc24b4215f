"""MultiStepSAM against the eager multi-step reference of variant_reference.py: projected and unprojected
steps, SGD and AdamW, both calling styles, one step equal to SAM bit for bit, n + 1 passes, exact
resume, non-finite gradients in any pass, GradScaler, and bad values."""

from __future__ import annotations

import io
import math

import pytest
import torch
from cases import pairwise_over_backends
from eager_reference import (
    assert_models_close,
    assert_models_equal,
    batch_loss,
    clone_model,
    make_batches,
    make_model,
)
from tolerance import assert_bitwise_equal
from variant_reference import EagerMultiStepSAM

from sam_kernels.optim import SAM, MultiStepSAM

BASES = {
    "sgd": (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3}),
    "adamw": (torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.05}),
}
#: (ascent steps, step size): the default 1/n (the projection cannot act) and a long step it must cut.
SETTINGS = {"two": (2, None), "three_projected": (3, 0.8)}


def build(model, base_name: str, backend: str, steps: int, step_size, **options):
    base, kwargs = BASES[base_name]
    return MultiStepSAM(model.parameters(), base, rho=0.1, ascent_steps=steps, step_size=step_size,
                        backend=backend, **kwargs, **options)


def two_call_step(optimizer, model, x, y, corrupt_at: int | None = None, value: float = math.nan) -> None:
    """The documented loop: first_step after each of the n ascent backwards, the last backward, then
    second_step; ``corrupt_at`` writes ``value`` into that pass's first gradient."""
    for j in range(optimizer.policy.ascent_steps + 1):
        if j == 0:
            batch_loss(model, x, y).backward()
        else:
            with optimizer.second_pass():
                batch_loss(model, x, y).backward()
        if j == corrupt_at:
            next(model.parameters()).grad.view(-1)[0] = value
        if j < optimizer.policy.ascent_steps:
            optimizer.first_step(zero_grad=True)
    optimizer.second_step(zero_grad=True)


def closure_step(optimizer, model, x, y) -> int:
    """One step(closure) in torch's convention; returns the closure's calls."""
    calls = []

    def closure():
        calls.append(1)
        optimizer.zero_grad()
        loss = batch_loss(model, x, y)
        loss.backward()
        return loss

    optimizer.step(closure)
    optimizer.zero_grad()
    return len(calls)


@pairwise_over_backends(setting=list(SETTINGS), base_name=list(BASES))
def test_multi_step_matches_reference(backend, setting, base_name):
    """Three steps (two-call, closure, two-call) equal the reference's; the closure runs n + 1 times."""
    steps, step_size = SETTINGS[setting]
    model = make_model()
    expected = clone_model(model)
    optimizer = build(model, base_name, backend, steps, step_size)
    base, kwargs = BASES[base_name]
    reference = EagerMultiStepSAM(expected, base(expected.parameters(), **kwargs), rho=0.1, steps=steps,
                                  step_size=step_size)
    for index, (x, y) in enumerate(make_batches(3)):
        if index == 1:
            assert closure_step(optimizer, model, x, y) == steps + 1
        else:
            two_call_step(optimizer, model, x, y)
        reference.step(expected, x, y)
    assert_models_close(model, expected)


def test_the_projection_acts_in_the_projected_setting():
    """The long steps leave the ball, so the projection changes the result (the test above can fail
    when it is missing)."""
    results = []
    for project in (True, False):
        model = make_model()
        reference = EagerMultiStepSAM(model, torch.optim.SGD(model.parameters(), lr=0.05), rho=0.1, steps=3,
                                      step_size=0.8, project=project)
        reference.step(model, *make_batches(1)[0])
        results.append([p.detach().clone() for p in model.parameters()])
    assert any((a - b).abs().max() > 1e-6 for a, b in zip(*results, strict=True))


def test_one_ascent_step_is_sam_bit_for_bit(backend):
    model, twin = make_model(), make_model()
    multi = MultiStepSAM(model.parameters(), torch.optim.SGD, rho=0.1, ascent_steps=1, lr=0.05, momentum=0.9,
                         backend=backend)
    sam = SAM(twin.parameters(), torch.optim.SGD, rho=0.1, lr=0.05, momentum=0.9, backend=backend)
    for x, y in make_batches(2):
        two_call_step(multi, model, x, y)
        two_call_step(sam, twin, x, y)
    assert_models_equal(model, twin)


def test_resume_equals_uninterrupted_run(backend):
    batches = make_batches(3)
    model = make_model()
    optimizer = build(model, "adamw", backend, 2, None)
    for x, y in batches[:2]:
        two_call_step(optimizer, model, x, y)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    two_call_step(optimizer, model, *batches[2])
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed = make_model(seed=9)
    resumed.load_state_dict(checkpoint["model"])
    again = build(resumed, "adamw", backend, 2, None)
    again.load_state_dict(checkpoint["optimizer"])
    two_call_step(again, resumed, *batches[2])
    assert_models_equal(resumed, model)


@pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")
@pytest.mark.parametrize("corrupt_at", [0, 1, 2])
def test_non_finite_gradient_in_any_pass_skips_the_step(backend, corrupt_at):
    """A NaN in the first, the intermediate or the last pass: the weights come back bit for bit, the
    optimizer state is unchanged, and the next step equals the reference's."""
    model = make_model()
    expected = clone_model(model)
    optimizer = build(model, "sgd", backend, 2, None)
    reference = EagerMultiStepSAM(expected, torch.optim.SGD(expected.parameters(), **BASES["sgd"][1]),
                                  rho=0.1, steps=2)
    batches = make_batches(3)
    two_call_step(optimizer, model, *batches[0])
    reference.step(expected, *batches[0])
    before = [p.detach().clone() for p in model.parameters()]
    state = {k: v.clone() for k, v in optimizer.state[next(model.parameters())].items()}
    two_call_step(optimizer, model, *batches[1], corrupt_at=corrupt_at)
    assert reference.step(expected, *batches[1], corrupt_at=corrupt_at, value=math.nan)
    assert_bitwise_equal(list(model.parameters()), before, "a skipped step restores w")
    for key, value in optimizer.state[next(model.parameters())].items():
        assert_bitwise_equal([value], [state[key]], f"state {key}")
    two_call_step(optimizer, model, *batches[2])
    reference.step(expected, *batches[2])
    assert_models_close(model, expected)


def test_grad_scaler_steps_equal_unscaled_steps(backend):
    """fp32 under a GradScaler (scale 2**10) on every ascent step: the same weights as without it, to
    rounding (the scale is a power of two)."""
    model, twin = make_model(), make_model()
    scaled = build(model, "sgd", backend, 2, 0.8)
    plain = build(twin, "sgd", backend, 2, 0.8)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    for x, y in make_batches(2):
        scaler.scale(batch_loss(model, x, y)).backward()
        scaled.first_step(zero_grad=True, grad_scaler=scaler)
        with scaled.second_pass():
            scaler.scale(batch_loss(model, x, y)).backward()
        scaled.first_step(zero_grad=True, grad_scaler=scaler)
        with scaled.second_pass():
            scaler.scale(batch_loss(model, x, y)).backward()
        scaler.step(scaled)
        scaler.update()
        scaled.zero_grad()
        two_call_step(plain, twin, x, y)
    assert_models_close(model, twin)


def test_extra_and_mixed_first_steps_are_refused(backend):
    model = make_model()
    optimizer = build(model, "sgd", backend, 2, None)
    x, y = make_batches(1)[0]
    before = [p.detach().clone() for p in model.parameters()]
    batch_loss(model, x, y).backward()
    optimizer.first_step(zero_grad=True)
    with optimizer.second_pass():
        batch_loss(model, x, y).backward()
    optimizer.first_step(zero_grad=True)
    with pytest.raises(RuntimeError, match="takes 2 ascent steps"):
        optimizer.first_step()
    with optimizer.second_pass():
        batch_loss(model, x, y).backward()
    optimizer.second_step(zero_grad=True)
    batch_loss(model, x, y).backward()
    optimizer.first_step(zero_grad=True)
    batch_loss(model, x, y).backward()
    with pytest.raises(RuntimeError, match="same grad_scaler"):
        optimizer.first_step(grad_scaler=torch.amp.GradScaler("cpu"))
    assert not optimizer._pending_ascent()  # the mixed call put w back
    assert any((a - b).abs().max() > 0 for a, b in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize("options, match", [
    ({"ascent_steps": 0}, "ascent_steps"),
    ({"ascent_steps": 1.5}, "ascent_steps"),
    ({"ascent_steps": True}, "ascent_steps"),
    ({"step_size": 0.0}, "step_size"),
    ({"step_size": -1.0}, "step_size"),
    ({"step_size": math.inf}, "step_size"),
    ({"step_size": 1.0, "adaptive": True}, "adaptive"),
])
def test_bad_values_are_refused(options, match):
    with pytest.raises(ValueError, match=match):
        MultiStepSAM(make_model().parameters(), torch.optim.SGD, lr=0.1, **options)


def test_groups_with_different_rho_cannot_be_projected():
    model = make_model()
    params = list(model.parameters())
    optimizer = MultiStepSAM([{"params": params[:2], "rho": 0.2}, {"params": params[2:]}], torch.optim.SGD,
                             rho=0.1, ascent_steps=2, step_size=1.0, lr=0.1, backend="torch")
    x, y = make_batches(1)[0]
    before = [p.detach().clone() for p in params]
    batch_loss(model, x, y).backward()
    with pytest.raises(ValueError, match="same rho"):
        optimizer.first_step(zero_grad=True)
    assert_bitwise_equal(params, before, "an error in the ascent restores w")
