"""The rho schedulers against their formulas: LambdaRho, MultiplicativeRho and ProportionalRho write each
group's radius at construction and at every step, chain, resume exactly, and refuse bad settings. (GSAM
under ProportionalRho against its reference: test_variants.py.)"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from eager_reference import assert_models_equal, closure_step, make_batches, make_model

from sam_kernels.optim import SAM, LambdaRho, MultiplicativeRho, ProportionalRho

STEPS = 3
LR_MAX, LR_MIN, RHO_MAX, RHO_MIN = 0.05, 0.005, 0.1, 0.02
RHO_BOUNDS = {"rho_max": RHO_MAX, "rho_min": RHO_MIN, "lr_max": LR_MAX, "lr_min": LR_MIN}


def test_lambda_rho_scales_each_groups_initial_rho():
    model = make_model()
    params = list(model.parameters())
    sam = SAM([{"params": params[:2]}, {"params": params[2:], "rho": 0.2}], torch.optim.SGD, rho=0.1,
              lr=0.05, backend="torch")
    scheduler = LambdaRho(sam, lambda t: 0.5**t)
    for t, (x, y) in enumerate(make_batches(STEPS)):
        rhos = [0.1 * 0.5**t, 0.2 * 0.5**t]
        assert scheduler.get_last_rho() == pytest.approx(rhos)
        assert [group["sam_rho"] for group in sam.param_groups] == pytest.approx(rhos)
        closure_step(sam, model, x, y)
        scheduler.step()


def make_rho_schedule(kind: str, optimizer):
    if kind == "lambda":
        return LambdaRho(optimizer, lambda t: 1.0 / (1 + t))
    return ProportionalRho(optimizer, **RHO_BOUNDS)


@pytest.mark.parametrize("kind", ["lambda", "proportional"])
def test_rho_schedule_resumes_identically(kind):
    """Save model, optimizer, LR and rho schedules after 2 of 4 steps, load into fresh ones: the resumed
    run sets the same rho at every step and ends with the same weights, bit for bit."""
    batches = make_batches(4)

    def build_all(model):
        sam = SAM(model.parameters(), torch.optim.SGD, rho=RHO_MAX, lr=LR_MAX, momentum=0.9, backend="torch")
        lr_schedule = torch.optim.lr_scheduler.CosineAnnealingLR(sam, T_max=4, eta_min=LR_MIN)
        return sam, lr_schedule, make_rho_schedule(kind, sam)

    def steps(parts, model, chunk) -> list[list[float]]:
        sam, lr_schedule, rho_schedule = parts
        seen = []
        for x, y in chunk:
            seen.append([group["sam_rho"] for group in sam.param_groups])
            closure_step(sam, model, x, y)
            lr_schedule.step()
            rho_schedule.step()
        return seen + [rho_schedule.get_last_rho()]

    model = make_model()
    parts = build_all(model)
    steps(parts, model, batches[:2])
    checkpoint = copy.deepcopy({"model": model.state_dict(), **{
        key: part.state_dict() for key, part in zip(("sam", "lr", "rho"), parts, strict=True)}})
    straight = steps(parts, model, batches[2:])

    resumed = make_model(seed=9)
    resumed.load_state_dict(checkpoint["model"])
    again = build_all(resumed)
    for key, part in zip(("sam", "lr", "rho"), again, strict=True):
        part.load_state_dict(checkpoint[key])
    assert steps(again, resumed, batches[2:]) == straight
    assert len({rho for rhos in straight for rho in rhos}) > 1
    assert_models_equal(resumed, model)



def test_proportional_rho_refuses_equal_learning_rates():
    sam = SAM(make_model().parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match=r"lr_max|lr_min"):
        ProportionalRho(sam, rho_max=0.1, rho_min=0.01, lr_max=0.1, lr_min=0.1)


def test_proportional_rho_follows_the_learning_rate_formula():
    sam = SAM(make_model().parameters(), torch.optim.SGD, rho=0.5, lr=LR_MAX)
    schedule = ProportionalRho(sam, **RHO_BOUNDS)
    for lr in (LR_MAX, 0.03, LR_MIN):
        sam.param_groups[0]["lr"] = lr
        schedule.step()
        expected = RHO_MIN + (RHO_MAX - RHO_MIN) * (lr - LR_MIN) / (LR_MAX - LR_MIN)
        assert sam.param_groups[0]["sam_rho"] == pytest.approx(expected)
    assert schedule.get_last_rho() == pytest.approx([RHO_MIN])


def test_multiplicative_rho_chains_after_a_closed_form_schedule():
    """LambdaRho sets rho from its formula, then MultiplicativeRho multiplies what it finds."""
    sam = SAM(make_model().parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    closed = LambdaRho(sam, lambda t: 1.0 + t)
    decay = MultiplicativeRho(sam, lambda t: 0.5)
    for t in range(1, 4):
        closed.step()
        decay.step()
        assert sam.param_groups[0]["sam_rho"] == pytest.approx(0.1 * (1.0 + t) * 0.5)


@pytest.mark.parametrize("make, message", [
    (lambda sam: LambdaRho(sam, lambda t: -1.0), "rho -"),
    (lambda sam: LambdaRho(sam, [lambda t: 1.0, lambda t: 1.0]), "rho_lambda"),
    (lambda sam: ProportionalRho(sam, rho_max=0.1, rho_min=0.2, lr_max=0.1, lr_min=0.0), "rho_max"),
    (lambda sam: ProportionalRho(sam, rho_max=math.nan, rho_min=0.0, lr_max=0.1, lr_min=0.0), "rho_max"),
    (lambda sam: LambdaRho(torch.optim.SGD(make_model().parameters(), lr=0.1), lambda t: 1.0), "optimizer"),
])
def test_bad_settings_are_refused_with_the_option_named(make, message):
    sam = SAM(make_model().parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    with pytest.raises((ValueError, TypeError), match=message):
        make(sam)
